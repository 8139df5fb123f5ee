# SPDX-License-Identifier: BSD-3-Clause
# Copyright 2026 The vhost_user_frontend.py Authors
"""A vhost-user front-end (the VMM side) in one pure-Python file.

Drives any vhost-user back-end daemon (qemu-storage-daemon, virtiofsd, DPDK's
vhost PMD, rust-vmm vhost-device-*, crosvm device back-ends, SPDK) with no VM,
no compiler and no third-party package. Because there is no guest, this module
is also the virtio *driver*: it owns guest memory (memfd), lays out the
virtqueues there (split or packed), posts descriptor chains, kicks, and reaps
used entries.

Protocol: the vhost-user specification in QEMU's docs/interop/vhost-user.rst,
newest text (front-end requests 1-45, protocol features 0-23), plus crosvm's
GPU_MAP/EXTERNAL_MAP back-end requests. Modelled on crosvm's
devices/src/virtio/vhost_user_frontend over vmm_vhost::BackendClient.

Example::

    import vhost_user_frontend as vu
    with vu.BackendClient.connect("/tmp/blk.sock") as client:
        client.set_owner()
        features = client.get_features()
        print(vu.VirtioFeature.names(features, vu.DeviceType.BLOCK))
        if features & vu.VirtioFeature.PROTOCOL_FEATURES:
            offered = client.get_protocol_features()
            print(vu.ProtocolFeature.names(offered))
            client.set_protocol_features(offered & vu.ProtocolFeature.CONFIG)
            print(client.get_config(0, 60).hex())

Sections (``grep -n '^# .*###'`` prints them with line numbers):
Head, Errors, Constants, Wire format, OS primitives, Channel, BackendClient,
GuestMemory, Queue, Packed queue, Backend requests, Worker, VhostUserFrontend, Device
plumbing, Block, Net, virtio-fs, Embedded back-end, Conformance checks, Bench,
Device commands, Command line.
"""

############################################################################
# Head: imports, version, public names #####################################
############################################################################

import array
import binascii
import collections
import ctypes
import enum
import errno
import fcntl
import functools
import io
import logging
import mmap
import operator
import os
import select
import socket
import stat
import struct
import sys
import threading
import time
import weakref
from typing import (IO, Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional,
                    Sequence, Set, Tuple, Union)

__version__ = "0.1.0"

__all__ = [
    # Errors
    "VhostUserError", "ProtocolError", "BackendError", "Disconnected",
    "FeatureNotNegotiated", "VhostUserTimeout", "BackendShrank", "DeviceClosed", "ReadOnlyDevice",
    # Constants
    "FrontendReq", "BackendReq", "VirtioFeature", "ProtocolFeature", "DeviceType",
    "MAX_FDS", "MAX_MEM_TABLE_REGIONS", "MAX_CONFIG_SIZE", "MAX_QUEUE_SIZE", "MAX_VRINGS",
    "CONFIG_FLAG_WRITABLE", "CONFIG_FLAG_MIGRATION",
    "TRANSFER_SAVE", "TRANSFER_LOAD", "TRANSFER_PHASE_STOPPED",
    # Wire payloads
    "VringState", "VringAddr", "MemoryRegion", "LogInfo", "IotlbMsg",
    "DeviceConfig", "VringArea", "InflightInfo", "ShmemMap", "ShmemConfig",
    # OS, client, memory
    "Event", "BackendClient", "GuestMemory", "Queue",
    # Frontend
    "SharedMemoryRegion", "BackendReqHandler", "Interrupt", "VhostUserFrontend", "DeviceState",
    "DirtyLog",
    # Devices
    "BlockDevice", "NetDevice", "FsDevice",
    # Command line
    "main",
]

_log = logging.getLogger(__name__)

# Shorthands for the public signatures' annotations, in typing's spelling that CPython 3.6
# evaluates (no "X | Y", no list[int]).
_Buffer = Union[bytes, bytearray, memoryview]     # bytes-like data the call reads
_WBuffer = Union[bytearray, memoryview]           # a buffer the call writes into
_Path = Union[str, bytes, os.PathLike]


############################################################################
# Errors ###################################################################
############################################################################

class VhostUserError(Exception):
    """Base of every error this module raises about the vhost-user session.

    ``request`` is the request being served when the error happened (a
    ``FrontendReq``/``BackendReq`` member, a raw int for an unknown code, or
    None).
    """

    def __init__(self, message: str, request: Optional[int] = None) -> None:
        super().__init__(message)
        self.request = request


class ProtocolError(VhostUserError):
    """The peer sent something malformed, unexpected, or with the wrong fds."""


class BackendError(VhostUserError):
    """The back-end reported failure (non-zero ack or status); see ``value``."""

    def __init__(self, message: str, request: Optional[int] = None,
                 value: Optional[int] = None) -> None:
        super().__init__(message, request)
        self.value = value


class Disconnected(VhostUserError, ConnectionError):
    """The peer closed the connection (EOF, EPIPE, ECONNRESET)."""


class FeatureNotNegotiated(VhostUserError):
    """The request needs a feature that was not negotiated; nothing was sent."""


class VhostUserTimeout(VhostUserError, TimeoutError):
    """The peer did not answer in time; the connection is unusable after it."""


class BackendShrank(Disconnected):
    """The back-end offers less than the device uses (features, queues, a smaller disk).

    Raised when a device reconnects or moves to such a back-end; retrying
    cannot help, so ``reconnect=`` gives up at once.
    """


class DeviceClosed(VhostUserError, ValueError):
    """The device was closed: before the call, or while the call waited (also a ValueError)."""


class ReadOnlyDevice(VhostUserError, OSError):
    """A write to a device that is read-only; ``errno`` is EROFS (also an OSError)."""

    def __init__(self, message: str, request: Optional[int] = None) -> None:
        super().__init__(message, request)
        self.errno = errno.EROFS
        self.strerror = message

    def __str__(self):
        # OSError would print "[Errno 30] WRITE: ...": say it as every other error does.
        return self.strerror


############################################################################
# Constants ################################################################
############################################################################

#: Most fds we accept in one received message (vmm_vhost MAX_ATTACHED_FD_ENTRIES).
MAX_FDS = 32
#: Regions in one SET_MEM_TABLE without CONFIGURE_MEM_SLOTS (spec "region0..region7").
MAX_MEM_TABLE_REGIONS = 8
#: QEMU and libvhost-user cap the device config space at 256 bytes.
MAX_CONFIG_SIZE = 256
#: Largest split-ring size in the virtio spec (2.7: Queue Size up to 32768).
MAX_QUEUE_SIZE = 32768
#: VHOST_USER_MAX_VRINGS in rust-vmm and crosvm.
MAX_VRINGS = 0x8000
#: Vring fd messages carry the index in bits 0-7 (spec "Vring descriptor index").
_VRING_IDX_MASK = 0xFF
_VRING_NOFD = 0x100

_VERSION = 0x1
_FLAG_REPLY = 0x4
_FLAG_NEED_REPLY = 0x8
_FLAG_VERSION_MASK = 0x3


class FrontendReq(enum.IntEnum):
    """Front-end to back-end requests (spec "Front-end message types")."""
    GET_FEATURES = 1                #: Back-end's virtio features.
    SET_FEATURES = 2                #: Features the driver acked.
    SET_OWNER = 3                   #: Start the session.
    RESET_OWNER = 4                 #: Deprecated; "disable all rings".
    SET_MEM_TABLE = 5               #: Guest memory regions, one fd each.
    SET_LOG_BASE = 6                #: Dirty-log buffer.
    SET_LOG_FD = 7                  #: Eventfd signalled after logging.
    SET_VRING_NUM = 8               #: Ring size.
    SET_VRING_ADDR = 9              #: Ring addresses (front-end user addresses).
    SET_VRING_BASE = 10             #: Next avail index.
    GET_VRING_BASE = 11             #: Stop the ring and return its base.
    SET_VRING_KICK = 12             #: Kick eventfd; starts the ring.
    SET_VRING_CALL = 13             #: Call eventfd.
    SET_VRING_ERR = 14              #: Error eventfd.
    GET_PROTOCOL_FEATURES = 15      #: Back-end's protocol features.
    SET_PROTOCOL_FEATURES = 16      #: Protocol features in use.
    GET_QUEUE_NUM = 17              #: Number of queues (MQ).
    SET_VRING_ENABLE = 18           #: Enable or disable a ring.
    SEND_RARP = 19                  #: Broadcast a fake RARP (RARP).
    NET_SET_MTU = 20                #: Set the net MTU (NET_MTU).
    SET_BACKEND_REQ_FD = 21         #: Back-end request channel (BACKEND_REQ).
    IOTLB_MSG = 22                  #: IOTLB update or invalidate.
    SET_VRING_ENDIAN = 23           #: Legacy ring endianness (CROSS_ENDIAN).
    GET_CONFIG = 24                 #: Read device config space (CONFIG).
    SET_CONFIG = 25                 #: Write device config space (CONFIG).
    CREATE_CRYPTO_SESSION = 26      #: CRYPTO_SESSION.
    CLOSE_CRYPTO_SESSION = 27       #: CRYPTO_SESSION.
    POSTCOPY_ADVISE = 28            #: Get a userfaultfd (PAGEFAULT).
    POSTCOPY_LISTEN = 29            #: PAGEFAULT.
    POSTCOPY_END = 30               #: PAGEFAULT.
    GET_INFLIGHT_FD = 31            #: Inflight buffer (INFLIGHT_SHMFD).
    SET_INFLIGHT_FD = 32            #: Inflight buffer on reconnect.
    GPU_SET_SOCKET = 33             #: vhost-user-gpu side channel.
    RESET_DEVICE = 34               #: Reset the device (RESET_DEVICE).
    VRING_KICK = 35                 #: In-band kick (INBAND_NOTIFICATIONS).
    GET_MAX_MEM_SLOTS = 36          #: CONFIGURE_MEM_SLOTS.
    ADD_MEM_REG = 37                #: CONFIGURE_MEM_SLOTS.
    REM_MEM_REG = 38                #: CONFIGURE_MEM_SLOTS.
    SET_STATUS = 39                 #: Virtio status byte (STATUS).
    GET_STATUS = 40                 #: STATUS.
    GET_SHARED_OBJECT = 41          #: dma-buf for a UUID (SHARED_OBJECT).
    SET_DEVICE_STATE_FD = 42        #: State transfer pipe (DEVICE_STATE).
    CHECK_DEVICE_STATE = 43         #: Result of the transfer (DEVICE_STATE).
    GET_SHMEM_CONFIG = 44           #: Shared memory regions (SHMEM).
    GET_VRING_BASE_SKIP_DRAIN = 45  #: Stop without draining.


class BackendReq(enum.IntEnum):
    """Back-end to front-end requests (spec "Back-end message types")."""
    IOTLB_MSG = 1                   #: IOTLB miss or access failure.
    CONFIG_CHANGE_MSG = 2           #: Device config space changed.
    VRING_HOST_NOTIFIER_MSG = 3     #: Host notifier area for a ring.
    VRING_CALL = 4                  #: In-band call.
    VRING_ERR = 5                   #: In-band error.
    SHARED_OBJECT_ADD = 6           #: Register a shared object UUID.
    SHARED_OBJECT_REMOVE = 7        #: Drop a shared object UUID.
    SHARED_OBJECT_LOOKUP = 8        #: Find a shared object's fd.
    SHMEM_MAP = 9                   #: Map an fd into a shared memory region.
    SHMEM_UNMAP = 10                #: Unmap it.
    GPU_MAP = 1006                  #: crosvm: map a GPU buffer.
    EXTERNAL_MAP = 1007             #: crosvm: map a host pointer.


def _req_name(code):
    """Name of a request code for messages; raw number when unknown."""
    for enum_cls in (FrontendReq, BackendReq):
        if isinstance(code, enum_cls):
            return code.name
    return "request %d" % code


def _flag_names(value, names):
    """Names of the set bits of ``value``; unknown bits as ``bit N``."""
    result = []
    bit = 0
    while value >> bit:
        if (value >> bit) & 1:
            result.append(names.get(bit, "bit %d" % bit))
        bit += 1
    return result


class VirtioFeature(enum.IntFlag):
    """Virtio transport feature bits and vhost's own (virtio spec 6)."""
    NOTIFY_ON_EMPTY = 1 << 24       #: Legacy.
    LOG_ALL = 1 << 26               #: VHOST_F_LOG_ALL, dirty logging.
    ANY_LAYOUT = 1 << 27            #: Legacy.
    RING_INDIRECT_DESC = 1 << 28    #: Indirect descriptors.
    RING_EVENT_IDX = 1 << 29        #: used_event / avail_event.
    PROTOCOL_FEATURES = 1 << 30     #: VHOST_USER_F_PROTOCOL_FEATURES.
    VERSION_1 = 1 << 32             #: Modern virtio.
    ACCESS_PLATFORM = 1 << 33       #: IOMMU_PLATFORM.
    RING_PACKED = 1 << 34           #: Packed rings.
    IN_ORDER = 1 << 35              #: Buffers used in order.
    ORDER_PLATFORM = 1 << 36        #: Platform memory ordering.
    SR_IOV = 1 << 37                #: SR-IOV.
    NOTIFICATION_DATA = 1 << 38     #: Extra data in notifications.
    NOTIF_CONFIG_DATA = 1 << 39     #: Notification config data.
    RING_RESET = 1 << 40            #: Per-ring reset.
    ADMIN_VQ = 1 << 41              #: Admin virtqueue.
    SUSPEND = 1 << 42               #: crosvm's VIRTIO_F_SUSPEND.

    @classmethod
    def names(cls, features: int, device_type: Optional[int] = None) -> List[str]:
        """Names of every set bit: transport names, then the device's own.

        Device-specific bits (0-23, 50-63) are named for ``device_type`` as
        ``BLK_SEG_MAX`` etc.; bits nobody names come back as ``bit N``.
        """
        table = {m.value.bit_length() - 1: m.name for m in cls}
        if device_type is not None:
            table.update(_DEVICE_FEATURE_NAMES.get(DeviceType(device_type), {}))
        return _flag_names(int(features), table)


#: Bits that belong to the device, not the transport (crosvm
#: VIRTIO_DEVICE_TYPE_SPECIFIC_FEATURES_MASK: bits 0-23 and 50-63).
_DEVICE_SPECIFIC_FEATURES = 0xFFFC_0000_00FF_FFFF


class ProtocolFeature(enum.IntFlag):
    """vhost-user protocol feature bits (spec "Protocol features")."""
    MQ = 1 << 0                     #: GET_QUEUE_NUM.
    LOG_SHMFD = 1 << 1              #: Shared-memory dirty log.
    RARP = 1 << 2                   #: SEND_RARP.
    REPLY_ACK = 1 << 3              #: NEED_REPLY is honoured.
    NET_MTU = 1 << 4                #: NET_SET_MTU.
    BACKEND_REQ = 1 << 5            #: Back-end request channel.
    CROSS_ENDIAN = 1 << 6           #: SET_VRING_ENDIAN.
    CRYPTO_SESSION = 1 << 7         #: Crypto sessions.
    PAGEFAULT = 1 << 8              #: Postcopy.
    CONFIG = 1 << 9                 #: GET_CONFIG / SET_CONFIG.
    BACKEND_SEND_FD = 1 << 10       #: fds on the back-end channel.
    HOST_NOTIFIER = 1 << 11         #: VRING_HOST_NOTIFIER_MSG.
    INFLIGHT_SHMFD = 1 << 12        #: GET/SET_INFLIGHT_FD.
    RESET_DEVICE = 1 << 13          #: RESET_DEVICE.
    INBAND_NOTIFICATIONS = 1 << 14  #: VRING_KICK and in-band calls.
    CONFIGURE_MEM_SLOTS = 1 << 15   #: GET_MAX_MEM_SLOTS, ADD/REM_MEM_REG.
    STATUS = 1 << 16                #: SET/GET_STATUS.
    XEN_MMAP = 1 << 17              #: Xen region layout.
    SHARED_OBJECT = 1 << 18         #: Shared objects.
    DEVICE_STATE = 1 << 19          #: SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE.
    GET_VRING_BASE_INFLIGHT = 1 << 20  #: In-flight migration.
    GPA_ADDRESSES = 1 << 21         #: Ring addresses are GPAs.
    SHMEM = 1 << 22                 #: GET_SHMEM_CONFIG, SHMEM_MAP/UNMAP.
    GET_VRING_BASE_SKIP_DRAIN = 1 << 23  #: Message 45.

    @classmethod
    def names(cls, features: int) -> List[str]:
        """Names of every set bit; unknown bits as ``bit N``."""
        table = {m.value.bit_length() - 1: m.name for m in cls}
        return _flag_names(int(features), table)


class DeviceType(enum.IntEnum):
    """Virtio device IDs (virtio spec 5), as crosvm's DeviceType knows them."""
    NET = 1
    BLOCK = 2
    CONSOLE = 3
    RNG = 4
    BALLOON = 5
    SCSI = 8
    P9 = 9
    MAC80211_HWSIM = 10
    GPU = 16
    INPUT = 18
    VSOCK = 19
    IOMMU = 23
    SOUND = 25
    FS = 26
    PMEM = 27
    VIDEO_ENCODER = 30
    VIDEO_DECODER = 31
    SCMI = 32
    TPM = 60
    PVCLOCK = 61
    WL = 63

    @classmethod
    def _missing_(cls, value):
        """Any other virtio device ID (i2c 34, gpio 41, ...): a member named ``TYPE_<id>``."""
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF:
            raise ValueError("%r is not a valid DeviceType" % (value,))  # 3.6 returns None
        member = int.__new__(cls, value)
        member._name_, member._value_ = "TYPE_%d" % value, value
        return cls._value2member_map_.setdefault(value, member)

    @property
    def min_queues(self) -> int:
        """Queues a spec-compliant device of this type must implement (crosvm; else 1)."""
        return _MIN_QUEUES.get(self, 1)

    def feature_names(self, features: int) -> List[str]:
        """Names of ``features`` with this type's device-specific names."""
        return VirtioFeature.names(features, self)


_MIN_QUEUES = {
    DeviceType.NET: 3,  # rx, tx, ctrl (crosvm counts ctrl; b/314353246)
    DeviceType.BLOCK: 1, DeviceType.CONSOLE: 2, DeviceType.RNG: 1,
    DeviceType.BALLOON: 2, DeviceType.SCSI: 3, DeviceType.P9: 1,
    DeviceType.MAC80211_HWSIM: 2, DeviceType.GPU: 2, DeviceType.INPUT: 2,
    DeviceType.VSOCK: 3, DeviceType.IOMMU: 2, DeviceType.SOUND: 4,
    DeviceType.FS: 2, DeviceType.PMEM: 1, DeviceType.VIDEO_ENCODER: 2,
    DeviceType.VIDEO_DECODER: 2, DeviceType.SCMI: 2, DeviceType.TPM: 1,
    DeviceType.PVCLOCK: 1, DeviceType.WL: 2,
}

# Device-specific feature bit names (virtio spec 5.x "Feature bits").
_DEVICE_FEATURE_NAMES = {
    DeviceType.BLOCK: {
        0: "BLK_BARRIER", 1: "BLK_SIZE_MAX", 2: "BLK_SEG_MAX", 4: "BLK_GEOMETRY",
        5: "BLK_RO", 6: "BLK_BLK_SIZE", 7: "BLK_SCSI", 9: "BLK_FLUSH",
        10: "BLK_TOPOLOGY", 11: "BLK_CONFIG_WCE", 12: "BLK_MQ",
        13: "BLK_DISCARD", 14: "BLK_WRITE_ZEROES", 15: "BLK_LIFETIME",
        16: "BLK_SECURE_ERASE", 17: "BLK_ZONED",
    },
    DeviceType.NET: {
        0: "NET_CSUM", 1: "NET_GUEST_CSUM", 2: "NET_CTRL_GUEST_OFFLOADS",
        3: "NET_MTU", 5: "NET_MAC", 6: "NET_GSO", 7: "NET_GUEST_TSO4",
        8: "NET_GUEST_TSO6", 9: "NET_GUEST_ECN", 10: "NET_GUEST_UFO",
        11: "NET_HOST_TSO4", 12: "NET_HOST_TSO6", 13: "NET_HOST_ECN",
        14: "NET_HOST_UFO", 15: "NET_MRG_RXBUF", 16: "NET_STATUS",
        17: "NET_CTRL_VQ", 18: "NET_CTRL_RX", 19: "NET_CTRL_VLAN",
        20: "NET_CTRL_RX_EXTRA", 21: "NET_GUEST_ANNOUNCE", 22: "NET_MQ",
        23: "NET_CTRL_MAC_ADDR", 50: "NET_DEVICE_STATS", 52: "NET_VQ_NOTF_COAL",
        53: "NET_NOTF_COAL", 54: "NET_GUEST_USO4", 55: "NET_GUEST_USO6",
        56: "NET_HOST_USO", 57: "NET_HASH_REPORT", 59: "NET_GUEST_HDRLEN",
        60: "NET_RSS", 61: "NET_RSC_EXT", 62: "NET_STANDBY",
        63: "NET_SPEED_DUPLEX",
    },
    DeviceType.FS: {0: "FS_NOTIFICATION"},
    DeviceType.GPU: {
        0: "GPU_VIRGL", 1: "GPU_EDID", 2: "GPU_RESOURCE_UUID",
        3: "GPU_RESOURCE_BLOB", 4: "GPU_CONTEXT_INIT",
    },
    DeviceType.VSOCK: {
        0: "VSOCK_STREAM", 1: "VSOCK_SEQPACKET", 2: "VSOCK_NO_IMPLIED_STREAM",
    },
    DeviceType.CONSOLE: {
        0: "CONSOLE_SIZE", 1: "CONSOLE_MULTIPORT", 2: "CONSOLE_EMERG_WRITE",
    },
    DeviceType.RNG: {},
    DeviceType.INPUT: {},
    DeviceType.SCSI: {
        0: "SCSI_INOUT", 1: "SCSI_HOTPLUG", 2: "SCSI_CHANGE", 3: "SCSI_T10_PI",
    },
    DeviceType.SOUND: {0: "SND_CTLS"},
}


############################################################################
# Wire format ##############################################################
############################################################################

# Pure encoding and decoding: no sockets, no threads. All numbers are in the
# host's byte order (spec "Message Specification"); every supported host is
# little-endian, so the layouts say "<".

_HDR = struct.Struct("<III")          # request, flags, size
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")         # index, num
_ADDR = struct.Struct("<IIQQQQ")      # index, flags, desc, used, avail, log
_MEM_HDR = struct.Struct("<II")       # nregions, padding
_REGION = struct.Struct("<QQQQ")      # gpa, size, uaddr, mmap_offset
_MEMREG = struct.Struct("<QQQQQ")     # padding, then one region
_LOG = struct.Struct("<QQ")           # mmap_size, mmap_offset
_IOTLB = struct.Struct("<QQQBB6x")    # iova, size, uaddr, perm, type
_CONFIG_HDR = struct.Struct("<III")   # offset, size, flags
_AREA = struct.Struct("<QQQ")         # u64 (index | NOFD), size, offset
# The C struct is padded to 24 bytes; struct adds no trailing padding itself.
_INFLIGHT = struct.Struct("<QQHH4x")  # mmap_size, mmap_offset, num_queues, queue_size
_XFER = struct.Struct("<II")          # direction, phase
_MMAP = struct.Struct("<B7xQQQQ")     # shmid, fd_offset, shm_offset, len, flags
_SHMEM_COUNT = 256
_SHMCFG = struct.Struct("<II%dQ" % _SHMEM_COUNT)
_GPU_MAP = struct.Struct("<B7xQQII16s16s")  # crosvm GPU_MAP
_EXTERNAL_MAP = struct.Struct("<B7xQQQ")    # crosvm EXTERNAL_MAP
_UUID_SIZE = 16

#: SET_DEVICE_STATE_FD direction and phase (spec "Migrating back-end state").
TRANSFER_SAVE = 0
TRANSFER_LOAD = 1
TRANSFER_PHASE_STOPPED = 0
#: SET_DEVICE_STATE_FD reply: bit 8 set means "no fd returned".
_DEVICE_STATE_NO_FD = 0x100
#: GET_CONFIG flags (spec values; the Rust crates use bit flags instead).
CONFIG_FLAG_WRITABLE = 0
CONFIG_FLAG_MIGRATION = 1


class VringState(NamedTuple):
    """STATE payload: ring index and a number (size, base, enable)."""
    index: int  # type: ignore[assignment]  # the spec's name; hides tuple.index
    num: int


class VringAddr(NamedTuple):
    """ADDR payload. Used comes *before* avail on the wire."""
    index: int  # type: ignore[assignment]  # the spec's name; hides tuple.index
    flags: int
    desc: int
    used: int
    avail: int
    log: int


class MemoryRegion(NamedTuple):
    """One guest memory region as SET_MEM_TABLE / ADD_MEM_REG carry it."""
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


class LogInfo(NamedTuple):
    """LOG payload of SET_LOG_BASE."""
    mmap_size: int
    mmap_offset: int


class IotlbMsg(NamedTuple):
    """IOTLB payload (struct vhost_iotlb_msg)."""
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int


class DeviceConfig(NamedTuple):
    """CONFIG payload: a window of the device config space."""
    offset: int
    flags: int
    data: bytes


class VringArea(NamedTuple):
    """AREA payload of VRING_HOST_NOTIFIER_MSG."""
    index: int  # type: ignore[assignment]  # the spec's name; hides tuple.index
    no_fd: bool
    size: int
    offset: int


class InflightInfo(NamedTuple):
    """INFLIGHT payload of GET/SET_INFLIGHT_FD."""
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


class ShmemMap(NamedTuple):
    """MMAP payload of SHMEM_MAP / SHMEM_UNMAP. flags bit 0: map writable."""
    shmid: int
    fd_offset: int
    shm_offset: int
    len: int
    flags: int


class ShmemConfig(NamedTuple):
    """GET_SHMEM_CONFIG reply: ``sizes[shmid]``, 0 meaning unused."""
    nregions: int
    sizes: Tuple[int, ...]

    def regions(self) -> List[Tuple[int, int]]:
        """(shmid, size) of each region in use, capped at ``nregions``."""
        used = [(i, s) for i, s in enumerate(self.sizes) if s]
        return used[:self.nregions]


def _check_uint(name, value, width):
    """ValueError naming ``name`` unless ``value`` is an unsigned ``width``-bit integer."""
    if not isinstance(value, int) or not 0 <= value < 1 << width:
        raise ValueError("%s must be an unsigned %d-bit integer, got %r" % (name, width, value))


def _check_u64(name, value):
    _check_uint(name, value, 64)


def _check_u32(name, value):
    _check_uint(name, value, 32)


def _check_fields(value, widths):
    """ValueError naming the first field of a payload that does not fit its width in bits."""
    for name, field, width in zip(value._fields, value, widths):
        _check_uint(name, field, width)


def _fixed_codec(layout, payload, widths):
    """(encode, decode) for a payload that is one Struct of a NamedTuple's fields.

    ``encode(value)`` checks each field against its width in bits (ValueError
    naming the field); ``decode(request, body)`` checks the exact size
    (ProtocolError naming the request).
    """
    def encode(value):
        _check_fields(value, widths)
        return layout.pack(*value)

    def decode(request, body):
        _expect_size(request, body, layout.size)
        return payload._make(layout.unpack(body))
    return encode, decode


def _encode_header(request, flags, size):
    """The 12-byte message header."""
    return _HDR.pack(int(request), flags, size)


def _decode_header(data):
    """(request, flags, size) of a 12-byte header; the request stays an int."""
    if len(data) != _HDR.size:
        raise ProtocolError("header must be %d bytes, got %d" % (_HDR.size, len(data)))
    return _HDR.unpack(data)


def _encode_u64(value):
    _check_u64("value", value)
    return _U64.pack(value)


def _decode_u64(request, body):
    _expect_size(request, body, _U64.size)
    return _U64.unpack(body)[0]


_encode_state, _decode_state = _fixed_codec(_STATE, VringState, (32, 32))
_encode_vring_addr, _decode_vring_addr = _fixed_codec(_ADDR, VringAddr, (32, 32, 64, 64, 64, 64))
_encode_inflight, _decode_inflight = _fixed_codec(_INFLIGHT, InflightInfo, (64, 64, 16, 16))
_encode_iotlb, _decode_iotlb = _fixed_codec(_IOTLB, IotlbMsg, (64, 64, 64, 8, 8))
_encode_shmem_map, _decode_shmem_map = _fixed_codec(_MMAP, ShmemMap, (8, 64, 64, 64, 64))


class _PackedBase(NamedTuple):
    """SET/GET_VRING_BASE ``num`` of a packed ring (vhost-user.rst, "Ring states").

    Bits 0-14 the next avail position, bit 15 the driver's avail wrap
    counter; bits 16-30 the used position and bit 31 its wrap counter.
    """
    avail: int
    avail_wrap: int
    used: int
    used_wrap: int


def _encode_packed_base(base):
    """The 32-bit ``num`` of a ``_PackedBase``."""
    for name, value, limit in zip(base._fields, base, (0x7FFF, 1, 0x7FFF, 1)):
        if not isinstance(value, int) or not 0 <= value <= limit:
            raise ValueError("SET_VRING_BASE: packed %s %r is not in 0..%d"
                             % (name, value, limit))
    return base.avail | base.avail_wrap << 15 | (base.used | base.used_wrap << 15) << 16


def _decode_packed_base(num, size):
    """GET_VRING_BASE's answer for a packed ring of ``size`` entries, checked.

    Some back-ends (DPDK 22.11) return only the avail half and resume the used
    position where avail is (the ring was drained); an upper half of 0 is read
    that way.
    """
    request = FrontendReq.GET_VRING_BASE
    if not 0 <= num <= 0xFFFFFFFF:
        raise ProtocolError("GET_VRING_BASE: base %#x does not fit in 32 bits" % num, request)
    avail, avail_wrap = num & 0x7FFF, num >> 15 & 1
    used, used_wrap = (num >> 16 & 0x7FFF, num >> 31) if num >> 16 else (avail, avail_wrap)
    for name, value in (("avail", avail), ("used", used)):
        if value >= size:
            raise ProtocolError("GET_VRING_BASE: packed %s position %d (base %#x) is past "
                                "the ring's %d entries" % (name, value, num, size), request)
    return _PackedBase(avail, avail_wrap, used, used_wrap)


def _encode_mem_table(regions):
    """MEM payload: the true region count, then each region (not padded to 8)."""
    parts = [_MEM_HDR.pack(len(regions), 0)]
    for region in regions:
        for name, value in zip(region._fields, region):
            _check_u64(name, value)
        parts.append(_REGION.pack(*region))
    return b"".join(parts)


def _decode_mem_table(request, body):
    if len(body) < _MEM_HDR.size:
        raise ProtocolError("%s: MEM payload of %d bytes is shorter than its header"
                            % (_req_name(request), len(body)), request)
    count, padding = _MEM_HDR.unpack_from(body)
    _expect_size(request, body, _MEM_HDR.size + count * _REGION.size)
    _expect_zero(request, "padding", padding)
    return [MemoryRegion._make(_REGION.unpack_from(body, _MEM_HDR.size + i * _REGION.size))
            for i in range(count)]


def _encode_mem_region(region):
    for name, value in zip(region._fields, region):
        _check_u64(name, value)
    return _MEMREG.pack(0, *region)


def _decode_mem_region(request, body):
    _expect_size(request, body, _MEMREG.size)
    fields = _MEMREG.unpack(body)
    _expect_zero(request, "padding", fields[0])
    return MemoryRegion._make(fields[1:])


def _encode_config(config):
    _check_u32("offset", config.offset)
    _check_u32("flags", config.flags)
    return _CONFIG_HDR.pack(config.offset, len(config.data), config.flags) + bytes(config.data)


def _decode_config(request, body):
    if len(body) < _CONFIG_HDR.size:
        raise ProtocolError("%s: CONFIG payload of %d bytes is shorter than its header"
                            % (_req_name(request), len(body)), request)
    offset, size, flags = _CONFIG_HDR.unpack_from(body)
    _expect_size(request, body, _CONFIG_HDR.size + size)
    return DeviceConfig(offset, flags, bytes(body[_CONFIG_HDR.size:]))


def _encode_vring_area(area):
    index = area.index | (_VRING_NOFD if area.no_fd else 0)
    return _AREA.pack(index, area.size, area.offset)


def _decode_vring_area(request, body):
    _expect_size(request, body, _AREA.size)
    value, size, offset = _AREA.unpack(body)
    if value & ~(_VRING_IDX_MASK | _VRING_NOFD):
        raise ProtocolError("%s: reserved bits set in the ring index field: %#x"
                            % (_req_name(request), value), request)
    return VringArea(value & _VRING_IDX_MASK, bool(value & _VRING_NOFD), size, offset)


def _decode_shmem_config(request, body):
    _expect_size(request, body, _SHMCFG.size)
    fields = _SHMCFG.unpack(body)
    nregions, padding, sizes = fields[0], fields[1], fields[2:]
    _expect_zero(request, "padding", padding)
    if nregions > _SHMEM_COUNT:
        raise ProtocolError("%s: nregions %d is more than %d"
                            % (_req_name(request), nregions, _SHMEM_COUNT), request)
    return ShmemConfig(nregions, tuple(sizes))


def _encode_vring_fd_index(index, has_fd):
    """u64 of SET_VRING_KICK/CALL/ERR: index in bits 0-7, NOFD in bit 8."""
    return _U64.pack(index | (0 if has_fd else _VRING_NOFD))


def _expect_size(request, body, size):
    if len(body) != size:
        raise ProtocolError("%s: payload size %d, expected %d"
                            % (_req_name(request), len(body), size), request)


def _expect_zero(request, field, value):
    if value:
        raise ProtocolError("%s: %s must be 0, got %#x"
                            % (_req_name(request), field, value), request)


# Virtio device config spaces (virtio spec 5.x "Device configuration layout").
# Each field: (name, offset, struct format, feature bits that make it exist;
# () = always there). A field's "_pad" entries keep the size QEMU's structs
# have, so the read matches what QEMU itself asks for.
_DEVICE_CONFIG_FIELDS = {
    DeviceType.BLOCK: (
        ("capacity", 0, "<Q", ()), ("size_max", 8, "<I", (1,)), ("seg_max", 12, "<I", (2,)),
        ("cylinders", 16, "<H", (4,)), ("heads", 18, "B", (4,)), ("sectors", 19, "B", (4,)),
        ("blk_size", 20, "<I", (6,)),
        ("physical_block_exp", 24, "B", (10,)), ("alignment_offset", 25, "B", (10,)),
        ("min_io_size", 26, "<H", (10,)), ("opt_io_size", 28, "<I", (10,)),
        ("writeback", 32, "B", (11,)), ("_pad", 33, "B", (11,)),
        ("num_queues", 34, "<H", (12,)),
        ("max_discard_sectors", 36, "<I", (13,)), ("max_discard_seg", 40, "<I", (13,)),
        ("discard_sector_alignment", 44, "<I", (13,)),
        ("max_write_zeroes_sectors", 48, "<I", (14,)), ("max_write_zeroes_seg", 52, "<I", (14,)),
        ("write_zeroes_may_unmap", 56, "B", (14,)), ("_pad", 57, "3s", (14,)),
        ("max_secure_erase_sectors", 60, "<I", (16,)), ("max_secure_erase_seg", 64, "<I", (16,)),
        ("secure_erase_sector_alignment", 68, "<I", (16,)),
        ("zone_sectors", 72, "<I", (17,)), ("max_open_zones", 76, "<I", (17,)),
        ("max_active_zones", 80, "<I", (17,)), ("max_append_sectors", 84, "<I", (17,)),
        ("write_granularity", 88, "<I", (17,)), ("model", 92, "B", (17,)),
        ("_pad", 93, "3s", (17,)),
    ),
    DeviceType.NET: (
        ("mac", 0, "6s", (5,)), ("status", 6, "<H", (16,)),
        ("max_virtqueue_pairs", 8, "<H", (22,)), ("mtu", 10, "<H", (3,)),
        ("speed", 12, "<I", (63,)), ("duplex", 16, "B", (63,)),
        ("rss_max_key_size", 17, "B", (57, 60)),
        ("rss_max_indirection_table_length", 18, "<H", (60,)),
        ("supported_hash_types", 20, "<I", (57, 60)),
    ),
    DeviceType.FS: (
        ("tag", 0, "36s", ()), ("num_request_queues", 36, "<I", ()),
        ("notify_buf_size", 40, "<I", (0,)),
    ),
    DeviceType.GPU: (
        ("events_read", 0, "<I", ()), ("events_clear", 4, "<I", ()),
        ("num_scanouts", 8, "<I", ()), ("num_capsets", 12, "<I", ()),
    ),
    DeviceType.VSOCK: (("guest_cid", 0, "<Q", ()),),
    DeviceType.CONSOLE: (
        ("cols", 0, "<H", (0,)), ("rows", 2, "<H", (0,)), ("max_nr_ports", 4, "<I", (1,)),
        ("emerg_wr", 8, "<I", (2,)),
    ),
    DeviceType.SCSI: tuple(
        (name, 4 * i, "<I", ()) for i, name in enumerate((
            "num_queues", "seg_max", "max_sectors", "cmd_per_lun", "event_info_size",
            "sense_size", "cdb_size"))) + (
        ("max_channel", 28, "<H", ()), ("max_target", 30, "<H", ()), ("max_lun", 32, "<I", ()),
    ),
    DeviceType.SOUND: (
        ("jacks", 0, "<I", ()), ("streams", 4, "<I", ()), ("chmaps", 8, "<I", ()),
        ("controls", 12, "<I", (0,)),
    ),
}


def _config_fields_present(device_type, features):
    """The config fields of ``device_type`` that exist with ``features``."""
    return [field for field in _DEVICE_CONFIG_FIELDS.get(device_type, ())
            if not field[3] or any(features >> bit & 1 for bit in field[3])]


def _device_config_size(device_type, features):
    """Bytes of device config that exist for ``device_type`` offering ``features``.

    As QEMU's ``virtio_get_config_size``: up to the end of the last field
    whose feature is offered; 0 for a type whose layout is not known here.
    """
    return max([offset + struct.calcsize(fmt)
                for _, offset, fmt, _ in _config_fields_present(device_type, features)]
               or [0])


def _config_values(device_type, features, data):
    """{field name: value} of the config space ``data``, as the device drivers use it.

    Only fields that exist with ``features`` and lie within ``data``; byte
    fields (a MAC, a tag) stay bytes, the others are ints.
    """
    return {name: struct.unpack_from(fmt, data, offset)[0]
            for name, offset, fmt, _ in _config_fields_present(device_type, features)
            if name != "_pad" and offset + struct.calcsize(fmt) <= len(data)}


def _decode_device_config(device_type, features, data):
    """The config space ``data`` decoded for people: (field name, value) pairs.

    As ``_config_values``, in layout order, with a MAC as
    ``"52:54:00:12:34:56"`` and a virtio-fs tag as a string.
    """
    fields = []
    for name, value in _config_values(device_type, features, data).items():
        if name == "mac":
            value = ":".join("%02x" % b for b in bytearray(value))
        elif name == "tag":
            value = value.split(b"\0", 1)[0].decode("utf-8", "replace")
        fields.append((name, value))
    return fields


#: Dirty-log granularity: one bit per 4 KiB page of guest memory (VHOST_LOG_PAGE).
_LOG_PAGE = 4096


# -- virtio-blk (virtio spec 5.2) ----------------------------------------------

_BLK_F_SIZE_MAX = 1 << 1
_BLK_F_SEG_MAX = 1 << 2
_BLK_F_GEOMETRY = 1 << 4
_BLK_F_RO = 1 << 5
_BLK_F_BLK_SIZE = 1 << 6
_BLK_F_FLUSH = 1 << 9
_BLK_F_TOPOLOGY = 1 << 10
_BLK_F_CONFIG_WCE = 1 << 11
_BLK_F_MQ = 1 << 12
_BLK_F_DISCARD = 1 << 13
_BLK_F_WRITE_ZEROES = 1 << 14

_BLK_T_IN = 0
_BLK_T_OUT = 1
_BLK_T_FLUSH = 4
_BLK_T_GET_ID = 8
_BLK_T_DISCARD = 11
_BLK_T_WRITE_ZEROES = 13
_BLK_OP_NAMES = {_BLK_T_IN: "READ", _BLK_T_OUT: "WRITE", _BLK_T_FLUSH: "FLUSH",
                 _BLK_T_GET_ID: "GET_ID", _BLK_T_DISCARD: "DISCARD",
                 _BLK_T_WRITE_ZEROES: "WRITE_ZEROES"}
_BLK_STATUS_NAMES = {0: "OK", 1: "IOERR", 2: "UNSUPP"}
_BLK_ID_BYTES = 20
_SECTOR = 512
_BLK_REQ = struct.Struct("<IIQ")            # type, reserved, sector
_BLK_DISCARD_SEG = struct.Struct("<QII")    # sector, num_sectors, flags (bit 0: unmap)


# -- virtio-net (virtio spec 5.1) ----------------------------------------------

_NET_F_MTU = 1 << 3
_NET_F_MAC = 1 << 5
_NET_F_MRG_RXBUF = 1 << 15
_NET_F_STATUS = 1 << 16
_NET_F_MQ = 1 << 22
_NET_S_LINK_UP = 1
#: struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start,
#: csum_offset, then num_buffers with VERSION_1 or MRG_RXBUF (spec 5.1.6).
_NET_HDR = struct.Struct("<BBHHHHH")
_NET_HDR_LEGACY_SIZE = 10
_ETH_HLEN = 14
_NET_RX, _NET_TX = 0, 1


# -- FUSE for virtio-fs (virtio spec 5.11) -------------------------------------
#
# FUSE wire layouts are those of include/uapi/linux/fuse.h at protocol 7.31,
# in the driver's native byte order (FUSE has no wire endianness of its own;
# virtio-fs leaves it so, spec 5.11.6), little-endian here like the rings.

_FUSE_MAJOR = 7
_FUSE_MINOR = 31
_FUSE_ROOT_ID = 1
#: The kernel refuses a reply error outside -511..0 (fuse_dev_do_write:
#: ERESTARTSYS=512 and above are kernel-internal codes, never errnos).
_FUSE_ERRNO_MAX = 511


class _FuseOp(enum.IntEnum):
    """FUSE opcodes (enum fuse_opcode) this driver sends."""
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    ACCESS = 34
    CREATE = 35
    DESTROY = 38
    BATCH_FORGET = 42
    READDIRPLUS = 44


#: FUSE_INIT flags (fuse_init_in.flags) this driver offers.
_FUSE_BIG_WRITES = 1 << 5
_FUSE_ATOMIC_O_TRUNC = 1 << 3
_FUSE_DO_READDIRPLUS = 1 << 13
_FUSE_PARALLEL_DIROPS = 1 << 18
_FUSE_MAX_PAGES = 1 << 22
_FUSE_INIT_FLAGS = (_FUSE_ATOMIC_O_TRUNC | _FUSE_BIG_WRITES | _FUSE_DO_READDIRPLUS
                    | _FUSE_PARALLEL_DIROPS | _FUSE_MAX_PAGES)
#: fuse_setattr_in.valid bits.
_FATTR_MODE = 1 << 0
_FATTR_UID = 1 << 1
_FATTR_GID = 1 << 2
_FATTR_SIZE = 1 << 3
_FATTR_ATIME = 1 << 4
_FATTR_MTIME = 1 << 5
_FATTR_FH = 1 << 6
_FATTR_ATIME_NOW = 1 << 7
_FATTR_MTIME_NOW = 1 << 8
_FUSE_GETATTR_FH = 1 << 0

_FUSE_IN_HEADER = struct.Struct("<IIQQIIIHH")   # len opcode unique nodeid uid gid pid extlen pad
_FUSE_OUT_HEADER = struct.Struct("<IiQ")        # len error unique
_FUSE_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks a/m/ctime a/m/c nsec mode nlink
#                                                 uid gid rdev blksize flags
_FUSE_ENTRY_OUT = struct.Struct("<QQQQII")      # nodeid generation entry_valid attr_valid nsecs
_FUSE_ATTR_OUT = struct.Struct("<QII")          # attr_valid attr_valid_nsec dummy
_FUSE_GETATTR_IN = struct.Struct("<IIQ")        # getattr_flags dummy fh
_FUSE_SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
_FUSE_MKNOD_IN = struct.Struct("<IIII")         # mode rdev umask padding
_FUSE_MKDIR_IN = struct.Struct("<II")           # mode umask
_FUSE_U64 = struct.Struct("<Q")                 # forget_in, rename_in, link_in
_FUSE_U32_PAIR = struct.Struct("<II")           # open_in, access_in, getxattr_in/out, write_out
_FUSE_CREATE_IN = struct.Struct("<IIII")        # flags mode umask open_flags
_FUSE_OPEN_OUT = struct.Struct("<QII")          # fh open_flags padding
_FUSE_RELEASE_IN = struct.Struct("<QIIQ")       # fh flags release_flags lock_owner (= flush_in)
_FUSE_IO_IN = struct.Struct("<QQIIQII")         # read_in / write_in: fh offset size flags ...
_FUSE_FSYNC_IN = struct.Struct("<QII")          # fh fsync_flags padding
_FUSE_KSTATFS = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen
#                                                 frsize padding spare[6]
_FUSE_INIT_IN = struct.Struct("<IIII")          # major minor max_readahead flags (7.31 size)
_FUSE_INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
_FUSE_FORGET_ONE = struct.Struct("<QQ")         # nodeid nlookup
_FUSE_DIRENT = struct.Struct("<QQII")           # ino off namelen type; name; 8-aligned

_ENTRY_SIZE = _FUSE_ENTRY_OUT.size + _FUSE_ATTR.size
_ATTR_OUT_SIZE = _FUSE_ATTR_OUT.size + _FUSE_ATTR.size


# -- split virtqueue (virtio spec 2.7) -----------------------------------------

# Split virtqueue layout (virtio spec 2.7): descriptor table 16 bytes per
# entry, 16-aligned; avail ring flags, idx, ring[size], used_event; used ring
# flags, idx, ring[size] of (id u32, len u32), avail_event; 2- and 4-aligned.
# The packed layout is in the Packed queue section.

_DESC = struct.Struct("<QIHH")      # addr, len, flags, next
_DESC_LEN = struct.Struct("<I")     # a descriptor's len, 8 bytes in (split and packed alike)

#: Descriptor flags (virtio spec 2.7.5).
_DESC_F_NEXT = 1
_DESC_F_WRITE = 2
_DESC_F_INDIRECT = 4
#: avail->flags: the driver does not want interrupts (spec 2.7.7).
_AVAIL_F_NO_INTERRUPT = 1
#: used->flags: the device does not want kicks (spec 2.7.10).
_USED_F_NO_NOTIFY = 1
#: Longest buffer one descriptor can describe.
_MAX_DESC_LEN = 0xFFFFFFFF


def _split_ring_sizes(size):
    """(desc, avail, used) byte sizes of a split ring of ``size`` entries."""
    return 16 * size, 6 + 2 * size, 6 + 8 * size


def _need_event(event, new, old):
    """vring_need_event (spec 2.7.10): did idx cross ``event`` going old -> new?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


############################################################################
# OS primitives ############################################################
############################################################################

_MFD_CLOEXEC = getattr(os, "MFD_CLOEXEC", 0x1)
_MFD_ALLOW_SEALING = getattr(os, "MFD_ALLOW_SEALING", 0x2)
# fcntl.F_ADD_SEALS and friends are 3.8+; the values are from <linux/fcntl.h>.
_F_ADD_SEALS = 1024 + 9
_F_GET_SEALS = 1024 + 10
_F_SEAL_SEAL = 0x1
_F_SEAL_SHRINK = 0x2
_EFD_CLOEXEC = 0o2000000
_EFD_NONBLOCK = 0o4000
# syscall numbers for memfd_create where libc lacks the wrapper (glibc < 2.27).
_SYS_MEMFD_CREATE = {"x86_64": 319, "aarch64": 279, "riscv64": 279, "ppc64le": 360,
                     "s390x": 350, "i686": 356, "armv7l": 385}


@functools.lru_cache(maxsize=None)
def _libc():
    """The C library, loaded on first use (never at import)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.fcntl.restype = ctypes.c_int
    libc.fcntl.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int)
    return libc


def _check(result, what):
    """Raise OSError(errno) for a -1 libc result."""
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))
    return result


def _retry_eintr(call, what):
    while True:
        try:
            return _check(call(), what)
        except InterruptedError:
            continue


def _memfd_create(name, size):
    """An anonymous memory fd of ``size`` bytes, sealed against shrinking.

    The seal means a back-end cannot ``ftruncate`` the file under our
    mappings and SIGBUS this process (DESIGN: guest memory).
    """
    flags = _MFD_CLOEXEC | _MFD_ALLOW_SEALING
    if hasattr(os, "memfd_create"):  # 3.8+, bpo-26836
        fd = os.memfd_create(name, flags)
    else:
        libc = _libc()
        raw = name.encode()
        if hasattr(libc, "memfd_create"):
            libc.memfd_create.restype = ctypes.c_int
            libc.memfd_create.argtypes = (ctypes.c_char_p, ctypes.c_uint)
            fd = _retry_eintr(lambda: libc.memfd_create(raw, flags), "memfd_create")
        else:
            number = _SYS_MEMFD_CREATE[os.uname().machine]
            fd = _retry_eintr(lambda: libc.syscall(number, ctypes.c_char_p(raw),
                                                   ctypes.c_uint(flags)), "memfd_create")
    try:
        os.ftruncate(fd, size)
        _check(_libc().fcntl(fd, _F_ADD_SEALS, _F_SEAL_SHRINK | _F_SEAL_SEAL), "F_ADD_SEALS")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _eventfd():
    if hasattr(os, "eventfd"):  # 3.10+, bpo-41001
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    libc = _libc()
    libc.eventfd.restype = ctypes.c_int
    libc.eventfd.argtypes = (ctypes.c_uint, ctypes.c_int)
    return _retry_eintr(lambda: libc.eventfd(0, _EFD_CLOEXEC | _EFD_NONBLOCK), "eventfd")


_ONE = struct.pack("=Q", 1)


class Event:
    """A non-blocking eventfd: what vhost-user uses for kicks and calls."""

    _fd = -1

    def __init__(self) -> None:
        self._fd = _eventfd()

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("Event is closed")
        return self._fd

    def signal(self) -> None:
        """Add one to the counter, waking any waiter."""
        fd = self._fd   # fileno() spelled out: every kick comes here
        if fd < 0:
            raise ValueError("Event is closed")
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            pass  # counter saturated: it is signalled anyway

    def read(self) -> int:
        """Take and return the counter (0 when not signalled); never blocks."""
        try:
            return struct.unpack("=Q", os.read(self.fileno(), 8))[0]
        except BlockingIOError:
            return 0

    _poller = None  # type: Optional[select.poll]

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait until signalled and reset it; the count, or 0 on timeout."""
        fd = self.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = self._poller
        if poller is None:
            # poll(2) keeps no fd of its own; one per event spares a registration per wait.
            poller = self._poller = select.poll()
            poller.register(fd, select.POLLIN)
        remaining = timeout
        while True:
            # Poll first: a signalled counter returns at once, an idle one
            # costs no failed read.
            try:
                ready = poller.poll(None if remaining is None else remaining * 1000.0)
            except RuntimeError:   # another thread is polling this event: a poller of our own
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                continue
            if ready:
                count = self.read()
                if count:
                    return count
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                return self.read()

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self._poller = None
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "<Event fd=%d>" % self._fd


def _mapping_address(mapped):
    """Address of a writable mmap and the ctypes object that pins it.

    Keep the anchor for as long as the address is in use, and drop it before
    ``mapped.close()`` (which refuses while exported pointers exist).
    """
    anchor = ctypes.c_char.from_buffer(mapped)
    return ctypes.addressof(anchor), anchor


def _cpu_affinity(pid=0):
    """The CPUs process ``pid`` (0: this thread) may run on, as a frozenset; None if unknown."""
    if hasattr(os, "sched_getaffinity"):  # not in PyPy 3.9's os
        try:
            return frozenset(os.sched_getaffinity(pid))
        except OSError:
            return None
    try:
        with open("/proc/%s/status" % (pid or "thread-self")) as f:
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Cpus_allowed_list:"):
            cpus = set()
            for part in line.split(":", 1)[1].split(","):
                first, _, last = part.strip().partition("-")
                if first:
                    cpus.update(range(int(first), int(last or first) + 1))
            return frozenset(cpus)
    return None


def _pipe():
    """A close-on-exec pipe: (read_fd, write_fd)."""
    return os.pipe2(os.O_CLOEXEC)


def _close_fds(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


_MAP_FIXED = 0x10  # <linux/mman.h>: the same value on every Linux architecture
_PROT_NONE = 0     # the mmap module has no name for it
_MAP_FAILED = ctypes.c_void_p(-1).value


@functools.lru_cache(maxsize=None)
def _libc_mmap():
    """libc's mmap/munmap with 64-bit offsets (mmap64: off_t is 32 bits on 32-bit hosts)."""
    libc = _libc()
    mmap_fn = getattr(libc, "mmap64", libc.mmap)
    mmap_fn.restype = ctypes.c_void_p
    mmap_fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                        ctypes.c_int, ctypes.c_int64)
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return mmap_fn, libc.munmap


def _mmap_raw(address, length, prot, flags, fd=-1, offset=0):
    """mmap(2) at a chosen address, which the mmap module cannot do; returns the address."""
    mmap_fn, _ = _libc_mmap()
    result = mmap_fn(address, length, prot, flags, fd, offset)
    if result is None or result == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, "mmap: %s" % os.strerror(err))
    return result


def _munmap(address, length):
    _, munmap_fn = _libc_mmap()
    _check(munmap_fn(address, length), "munmap")


def _file_seals(fd):
    """The memfd seals of ``fd`` (0 for files that cannot be sealed)."""
    result = _libc().fcntl(fd, _F_GET_SEALS, 0)
    return 0 if result == -1 else result


# Memory ordering of the rings in guest memory. The back-end reads and
# writes them from another CPU while we touch them through the mmap, and
# Python has no barriers. What we rely on:
# - Every ring index and flag the other side may be touching at the same
#   time is written and read as one aligned access of its own width, through
#   the accessor ``_ring_words`` picks for the running interpreter, so the
#   back-end never sees a torn avail->idx. Ring entries and descriptors are
#   only ever read by the side that did not write them after the index that
#   covers them moved, so they are copied in bulk (slice assignment,
#   ``tolist()``; on PyPy, ``struct`` loads). virtio 1.0 rings are little-endian, and so must the host
#   be (checked in ``Queue.__init__``).
# - The interpreter performs our stores and loads in program order. On x86
#   (TSO) the CPU keeps store->store and load->load order too, which is all
#   that "descriptors before avail->idx" (spec 2.7.13) and "used->idx before
#   the used element" need. aarch64, POWER and RISC-V may reorder both, so
#   there ``_Fences.write``/``read`` are real fences as well.
# - Even TSO lets a later load pass an earlier store. Two places need
#   store->load order (spec 2.7.10 and 2.7.13.4): publishing avail->idx and
#   then reading the device's NO_NOTIFY / avail_event, and writing used_event
#   and then re-reading used->idx. Without it, a device that is just
#   switching from polling to sleeping and a driver that is just deciding not
#   to kick can both miss each other. ``_Fences.full`` provides it by
#   releasing and re-acquiring a private lock: the C library implements that
#   with atomic read-modify-write instructions (LOCK-prefixed on x86, a
#   store-release followed by a load-acquire on aarch64, which ARMv8 keeps in
#   order), each a full barrier for our purpose. It is cheap and
#   is taken once per notify decision and once per re-arm,
#   never per descriptor.

@functools.lru_cache(maxsize=None)
def _strongly_ordered():
    """True on x86, whose TSO keeps store->store and load->load order."""
    return os.uname().machine in ("x86_64", "amd64", "i386", "i486", "i586", "i686")


class _Fences:
    """The barriers the rings need (see the comment above)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._lock.acquire()
        if _strongly_ordered():
            self.write = self.read = _no_fence

    def full(self):
        """Order earlier stores before later loads (virtio_mb)."""
        self._lock.release()
        self._lock.acquire()

    write = read = full


def _no_fence():
    pass


# Which Python spelling of a u16/u32 load or store is one machine access
# differs per interpreter. Seen on x86, with
# one process storing 0x00FF and 0xFF00 (0x0000FFFF and 0xFFFF0000) in turn,
# another on the other CPU loading: CPython copies a memoryview.cast("H")
# item with a fixed-size memcpy, one move, and no load ever saw a torn
# value, while struct.pack_into stores byte by byte and some loads were
# torn. PyPy 7.3 is the other way round: its cast views tore some u16
# loads (and u32 ones too), its struct, which the JIT turns into one move,
# none. TestRingWordAtomicity repeats the measurement on every interpreter.
_RING_WORDS_VIA_STRUCT = sys.implementation.name == "pypy"
_RING_WORD_STRUCTS = {"H": struct.Struct("<H"), "I": struct.Struct("<I")}


def _ring_words(view, fmt):
    """(load(i), store(i, value), words) for the ``fmt`` ("H" or "I") items of ``view``.

    The accessor the running interpreter does as one aligned access (see
    the comment above); for ring indices and flags the other side may be
    touching at the same time. Release ``words`` (a view) before the memory.
    """
    if _RING_WORDS_VIA_STRUCT:
        layout = _RING_WORD_STRUCTS[fmt]
        width = layout.size
        unpack_from, pack_into = layout.unpack_from, layout.pack_into

        def load(i):
            return unpack_from(view, i * width)[0]

        def store(i, value):
            pack_into(view, i * width, value)
        return load, store, view
    words = view.cast(fmt)
    return words.__getitem__, words.__setitem__, words


if _RING_WORDS_VIA_STRUCT:
    # PyPy: a store through a cast view is slow, struct.pack_into a plain
    # move once compiled (PyPy 7.3.11), and the fast path's post makes
    # such stores for every request.
    # Used entries are read with struct loads too (Queue._used_words).
    class _FieldStores:
        """``fields[k] = value`` stores the u64 at byte ``offset + stride * k`` of ``view``.

        ``view`` is a cast "Q" view (the CPython spelling slices it).
        """

        __slots__ = ("view", "offset", "stride", "pack_into")

        def __init__(self, view, offset, stride):
            self.view, self.offset, self.stride = view, offset, stride
            self.pack_into = struct.Struct("<Q").pack_into

        def __setitem__(self, k, value):
            self.pack_into(self.view, self.offset + self.stride * k, value)

        def release(self):
            pass
else:
    def _FieldStores(view, offset, stride):  # type: ignore[no-redef]
        """``fields[k] = value`` stores the u64 at byte ``offset + stride * k`` of ``view``."""
        return view[offset // 8::stride // 8]


############################################################################
# Channel ##################################################################
############################################################################

# CMSG_SPACE is missing where there is no SCM_RIGHTS (Windows); the module must still import.
_CMSG_BUFSIZE = (socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
                 if hasattr(socket, "CMSG_SPACE") else 0)
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
#: Largest message body we read from a peer (rust-vmm MAX_MSG_SIZE is 4096;
#: GET_SHMEM_CONFIG's 2056 bytes is the largest reply the spec defines).
_MAX_BODY = 0x1000


class _Channel:
    """Framed vhost-user messages with SCM_RIGHTS over a unix stream socket.

    The only code in the module that calls ``sendmsg``/``recvmsg``. It knows
    framing and fd accounting, not what any request means.
    """

    _closing = False

    def __init__(self, sock, timeout):
        self.sock = sock
        self.timeout = timeout
        sock.settimeout(timeout)

    def fileno(self):
        return self.sock.fileno()

    def send(self, request, flags, body=b"", fds=(), what=None):
        """Send one message; the fds ride on the header's first byte.

        The spec (newest text) requires the fds to come with the first byte
        of the header, so a partial write continues without ancillary data.
        """
        what = what or _req_name(request)
        data = _HDR.pack(int(request), flags, len(body)) + bytes(body)
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        view = memoryview(data)
        try:
            sent = self.sock.sendmsg([view], ancillary)
            while sent < len(data):
                sent += self.sock.send(view[sent:])
        except socket.timeout:
            raise VhostUserTimeout("%s: send timed out after %.1f s" % (what, self.timeout),
                                   request)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise Disconnected("%s: back-end closed the connection (%s)" % (what, exc),
                               request) from exc
        except OSError as exc:
            if exc.errno == errno.EBADF and fds and self.sock.fileno() >= 0:
                # One of the caller's fds is not open: sendmsg sent nothing.
                raise ValueError("%s: cannot send fds %s: %s" % (what, list(fds), exc.strerror))
            raise Disconnected("%s: send failed: %s" % (what, exc), request) from exc
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("-> %s flags=%#x size=%d fds=%d", what, flags, len(body), len(fds))

    def recv_header(self, what, timeout=None):
        """(request, flags, size, fds) of the next message; fds are owned by the caller."""
        header, fds = self._recv_exact(_HDR.size, what, first=True, timeout=timeout)
        request, flags, size = _HDR.unpack(header)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("<- %s code=%d flags=%#x size=%d fds=%d", what, request, flags, size,
                       len(fds))
        return request, flags, size, fds

    def recv_body(self, size, what):
        if size > _MAX_BODY:
            raise ProtocolError("%s: message body of %d bytes is larger than %d"
                                % (what, size, _MAX_BODY))
        if not size:
            return b""
        body, _ = self._recv_exact(size, what, first=False)
        return body

    def _recv_exact(self, size, what, first, timeout=None):
        """Read exactly ``size`` bytes; fds are legal only with the first byte.

        ``timeout`` (default: the channel's) bounds the whole read, so a peer
        trickling one byte at a time cannot stretch it.
        """
        chunks = []
        fds = []
        got = 0
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while got < size:
                try:
                    if deadline is not None:
                        self.sock.settimeout(max(0.0, deadline - time.monotonic()))
                    data, ancdata, msg_flags, _ = self.sock.recvmsg(
                        size - got, _CMSG_BUFSIZE, _RECV_FLAGS)
                except socket.timeout:
                    raise VhostUserTimeout(
                        "%s: no %s from the back-end within %.1f s"
                        % (what, "reply" if first and not got else "rest of the message",
                           timeout))
                except InterruptedError:
                    continue
                except ConnectionResetError as exc:
                    raise Disconnected("%s: connection reset by the back-end" % what) from exc
                except OSError as exc:  # EBADF once close() on another thread got here
                    raise Disconnected("%s: %s" % (what, "the connection was closed while "
                                       "waiting" if self._closing else "receive failed: %s"
                                       % exc)) from exc
                received = self._take_fds(ancdata, what)
                if received and (got or not first):
                    fds.extend(received)
                    raise ProtocolError("%s: %d fd(s) arrived in the middle of a message"
                                        % (what, len(received)))
                fds.extend(received)
                if msg_flags & socket.MSG_CTRUNC:
                    raise ProtocolError("%s: ancillary data truncated (more than %d fds?)"
                                        % (what, MAX_FDS))
                if not data:
                    if self._closing:
                        raise Disconnected("%s: the connection was closed while waiting" % what)
                    if got or not first:
                        raise Disconnected("%s: back-end closed the connection mid-message "
                                           "(%d of %d bytes)" % (what, got, size))
                    raise Disconnected("%s: back-end closed the connection" % what)
                chunks.append(data)
                got += len(data)
        except BaseException:
            _close_fds(fds)
            raise
        finally:
            if deadline is not None and not self._closing:
                self.sock.settimeout(self.timeout)
        return b"".join(chunks), fds

    @staticmethod
    def _take_fds(ancdata, what):
        fds = []
        bad = None
        itemsize = array.array("i").itemsize
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                whole = len(payload) - len(payload) % itemsize
                fds.extend(array.array("i", payload[:whole]))
                if whole != len(payload):
                    bad = "truncated SCM_RIGHTS data (%d bytes)" % len(payload)
            else:
                bad = "unexpected control message level=%d type=%d" % (level, kind)
        if bad:
            _close_fds(fds)
            raise ProtocolError("%s: %s" % (what, bad))
        return fds

    def close(self):
        self._closing = True
        try:
            # Wakes a thread blocked on a reply at once (it reads EOF) rather
            # than leave it polling a closed fd until its timeout.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


############################################################################
# BackendClient ############################################################
############################################################################

_P = ProtocolFeature
_F = FrontendReq

#: The protocol feature each request needs (spec, per message).
_REQUEST_NEEDS = {
    _F.GET_QUEUE_NUM: _P.MQ,
    _F.SEND_RARP: _P.RARP,
    _F.NET_SET_MTU: _P.NET_MTU,
    _F.SET_BACKEND_REQ_FD: _P.BACKEND_REQ,
    _F.IOTLB_MSG: _P.REPLY_ACK,  # its ack is mandatory; QEMU also needs BACKEND_REQ
    _F.SET_VRING_ENDIAN: _P.CROSS_ENDIAN,
    _F.GET_CONFIG: _P.CONFIG,
    _F.SET_CONFIG: _P.CONFIG,
    _F.CREATE_CRYPTO_SESSION: _P.CRYPTO_SESSION,
    _F.CLOSE_CRYPTO_SESSION: _P.CRYPTO_SESSION,
    _F.POSTCOPY_ADVISE: _P.PAGEFAULT,
    _F.POSTCOPY_LISTEN: _P.PAGEFAULT,
    _F.POSTCOPY_END: _P.PAGEFAULT,
    _F.GET_INFLIGHT_FD: _P.INFLIGHT_SHMFD,
    _F.SET_INFLIGHT_FD: _P.INFLIGHT_SHMFD,
    _F.RESET_DEVICE: _P.RESET_DEVICE,
    _F.VRING_KICK: _P.INBAND_NOTIFICATIONS,
    _F.GET_MAX_MEM_SLOTS: _P.CONFIGURE_MEM_SLOTS,
    _F.ADD_MEM_REG: _P.CONFIGURE_MEM_SLOTS,
    _F.REM_MEM_REG: _P.CONFIGURE_MEM_SLOTS,
    _F.SET_STATUS: _P.STATUS,
    _F.GET_STATUS: _P.STATUS,
    _F.GET_SHARED_OBJECT: _P.SHARED_OBJECT,
    _F.SET_DEVICE_STATE_FD: _P.DEVICE_STATE,
    _F.CHECK_DEVICE_STATE: _P.DEVICE_STATE,
    _F.GET_SHMEM_CONFIG: _P.SHMEM,
    # The spec allows message 45 only together with bits 20 and 12.
    _F.GET_VRING_BASE_SKIP_DRAIN: (_P.GET_VRING_BASE_SKIP_DRAIN | _P.GET_VRING_BASE_INFLIGHT
                                   | _P.INFLIGHT_SHMFD),
}

#: Requests QEMU sends with NEED_REPLY when REPLY_ACK is negotiated
#: (hw/virtio/vhost-user.c); the default for ``ack=None``.
_ACKED_BY_DEFAULT = frozenset([
    _F.SET_MEM_TABLE, _F.SET_VRING_KICK, _F.SET_VRING_CALL, _F.SET_VRING_ENABLE,
    _F.SET_BACKEND_REQ_FD, _F.SET_CONFIG, _F.NET_SET_MTU, _F.IOTLB_MSG,
    _F.ADD_MEM_REG, _F.REM_MEM_REG, _F.POSTCOPY_LISTEN, _F.SET_STATUS,
])


class _Reply(NamedTuple):
    """What a request's reply must look like: allowed sizes and fd counts."""
    sizes: Tuple[int, ...]
    fds: Tuple[int, ...] = (0,)


_REPLY_U64 = _Reply((_U64.size,))
_REPLY_STATE = _Reply((_STATE.size,))


def _check_socket_path(path):
    """Refuse at once a path that exists but cannot be a back-end's socket."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return  # not there yet: the caller retries
    except OSError as exc:
        raise Disconnected("cannot connect to %s: %s" % (path, exc.strerror)) from exc
    if not stat.S_ISSOCK(mode):
        # connect() would say "Connection refused", which sends one looking
        # for a dead daemon rather than at the path.
        raise Disconnected("cannot connect to %s: it is not a unix socket (it is a %s)"
                           % (path, _file_kind(mode)))


def _file_kind(mode):
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "file of mode %o" % stat.S_IFMT(mode)


def _connect_cause(exc):
    """What a failed unix-socket connect means, in words a user can act on."""
    if isinstance(exc, FileNotFoundError):
        return "no such file (is the back-end running?)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (a socket file, but nothing listens on it)"
    if isinstance(exc, BlockingIOError):
        return "the back-end's listen backlog stayed full"
    if isinstance(exc, PermissionError):
        return "permission denied (the socket belongs to another user?)"
    return exc.strerror or str(exc)


#: A request's ``ack=``: None asks for a REPLY_ACK where QEMU asks, True or False always.
_Ack = Optional[bool]


class BackendClient:
    """One vhost-user connection to a back-end: one method per front-end request.

    Every method sends one request and validates the reply: the code echo,
    the reply flag and version (flags exactly 0x5, as QEMU demands), the exact
    size for that request and the fd count (stray fds are closed). A lock is
    held from request to reply, so threads may share a client. After a
    ``ProtocolError``, ``Disconnected`` or ``VhostUserTimeout`` the stream
    cannot be trusted: the client stays broken and every later call raises
    the same kind of error, naming the original cause.

    Requests that may be acknowledged take ``ack``: None (the default) asks
    for an ack where QEMU does, True always, False never. Acks are only ever
    requested when REPLY_ACK was negotiated; a non-zero ack raises
    ``BackendError``.

    Attributes:
        features: what the last GET_FEATURES returned, or None.
        acked_features: what the last SET_FEATURES sent, or None.
        protocol_features: what the last SET_PROTOCOL_FEATURES sent.
        queue_num: the back-end's queue count (GET_QUEUE_NUM, or set by the
            caller), used to refuse out-of-range ring indices.
        max_mem_slots: GET_MAX_MEM_SLOTS' answer, or None.
    """

    _channel = None  # type: Optional[_Channel]
    #: The socket path: where ``connect`` connected, or ``listen`` listened.
    path = None  # type: Optional[str]
    #: True for a client from ``listen`` (the back-end is the socket client).
    listening = False

    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        """Wrap an already connected unix stream socket (the client owns it).

        Args:
            sock: a connected ``AF_UNIX``/``SOCK_STREAM`` socket.
            timeout: seconds to wait for any reply before ``VhostUserTimeout``.
        """
        self._channel = _Channel(sock, timeout)
        self._lock = threading.Lock()
        self._broken = None  # type: Optional[VhostUserError]
        self.features = None
        self.acked_features = None  # type: Optional[int]
        self.protocol_features = 0
        self.queue_num = None
        self.max_mem_slots = None
        self._answered = False        # a first reply arrived (see _transact)

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0,
                reply_timeout: float = 5.0) -> "BackendClient":
        """Connect to a back-end listening on ``path``.

        Retries while the socket does not exist yet or refuses connections,
        as crosvm does, until ``timeout`` seconds have passed. A path that
        exists but is not a socket, or that we may not open, fails at once.

        Raises:
            Disconnected: nothing accepted the connection in time; the
                message names the cause (no such file, not a socket,
                nothing listening, permission denied).
        """
        deadline = time.monotonic() + timeout
        while True:
            _check_socket_path(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                sock.connect(path)
                client = cls(sock, reply_timeout)
                client.path = path
                return client
            except (FileNotFoundError, ConnectionRefusedError, BlockingIOError) as exc:
                # BlockingIOError (EAGAIN): the listener's backlog is full for now.
                sock.close()
                if time.monotonic() >= deadline:
                    raise Disconnected("cannot connect to %s within %.1f s: %s"
                                       % (path, timeout, _connect_cause(exc))) from exc
                time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
            except socket.timeout as exc:
                sock.close()
                raise Disconnected("cannot connect to %s: timed out after %.1f s"
                                   % (path, timeout)) from exc
            except OSError as exc:
                sock.close()
                raise Disconnected("cannot connect to %s: %s" % (path, _connect_cause(exc))) \
                    from exc
            except BaseException:
                sock.close()
                raise

    @classmethod
    def listen(cls, path: str, timeout: float = 30.0,
               reply_timeout: float = 5.0) -> "BackendClient":
        """Listen on ``path`` and wrap the first back-end that connects.

        For back-ends that are the socket client (DPDK ``client=1``, QEMU's
        server mode). The listening socket is closed and ``path`` removed.
        """
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.bind(path)
            try:
                server.listen(1)
                server.settimeout(timeout)
                try:
                    sock, _ = server.accept()
                except socket.timeout as exc:
                    raise VhostUserTimeout("no back-end connected to %s within %.1f s"
                                           % (path, timeout)) from exc
            finally:
                os.unlink(path)
        finally:
            server.close()
        try:
            sock.setblocking(True)
            client = cls(sock, reply_timeout)
            client.path, client.listening = path, True
            return client
        except BaseException:
            sock.close()
            raise

    # -- plumbing -----------------------------------------------------------

    @property
    def timeout(self) -> float:
        """Seconds to wait for a reply."""
        return self._channel.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._channel.timeout = value
        self._channel.sock.settimeout(value)

    @property
    def broken(self) -> Optional[VhostUserError]:
        """The error that made the connection unusable, or None."""
        return self._broken

    def fileno(self) -> int:
        """The socket's fd (for polling it for hang-up)."""
        return self._channel.fileno()

    def peer_pid(self) -> Optional[int]:
        """The back-end's process id (SO_PEERCRED), or None when the socket cannot say."""
        option = getattr(socket, "SO_PEERCRED", 17)   # Linux's value; not in every build
        try:
            creds = self._channel.sock.getsockopt(socket.SOL_SOCKET, option,
                                                  struct.calcsize("3i"))
        except (OSError, AttributeError):
            return None
        pid = struct.unpack("3i", creds)[0]
        return pid or None

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
            if self._broken is None:
                self._broken = Disconnected("the connection was closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "broken: %s" % self._broken if self._broken else "open"
        return "<BackendClient %s>" % state

    def _check_usable(self, request):
        if self._broken is not None:
            raise type(self._broken)("%s: connection unusable since an earlier error: %s"
                                     % (_req_name(request), self._broken), request)

    def _require(self, request):
        missing = _REQUEST_NEEDS.get(request, 0) & ~self.protocol_features
        if missing:
            raise FeatureNotNegotiated(
                "%s needs protocol feature %s, which was not negotiated"
                % (request.name, " and ".join(ProtocolFeature.names(missing))), request)

    def _want_ack(self, request, ack):
        negotiated = bool(self.protocol_features & _P.REPLY_ACK)
        if ack is None:
            return negotiated and request in _ACKED_BY_DEFAULT
        if ack and not negotiated:
            raise FeatureNotNegotiated("%s: an ack needs REPLY_ACK, which was not negotiated"
                                       % request.name, request)
        return bool(ack)

    def _transact(self, request, body=b"", fds=(), reply=None, ack=False, check=None):
        """Send ``request`` and validate its reply, all under the lock.

        ``reply`` describes a mandatory reply; ``check(body, fds)`` then turns
        it into the return value (default: the pair; the caller owns the fds).
        Without ``reply``, ``ack`` asks for a REPLY_ACK and checks it.
        A ``ProtocolError`` from ``check`` breaks the client like any other;
        the reply's fds are closed when ``check`` raises.
        """
        self._check_usable(request)
        with self._lock:
            self._check_usable(request)
            channel = self._channel
            flags = _VERSION | (_FLAG_NEED_REPLY if ack and reply is None else 0)
            waiting = False
            try:
                channel.send(request, flags, body, fds)
                if reply is None and not ack:
                    return None
                waiting = True
                try:
                    got_body, got_fds = self._receive_reply(channel, request,
                                                            reply or _REPLY_U64)
                except VhostUserTimeout as exc:
                    if self._answered:
                        raise
                    # qemu-storage-daemon (libvhost-user) serves one front-end at
                    # a time and leaves the next one in its listen backlog: the
                    # connect succeeds, the first reply never comes.
                    raise VhostUserTimeout("%s; the back-end never answered on this "
                                           "connection: it is probably serving another "
                                           "front-end (many back-ends serve one at a time)"
                                           % exc, request) from exc
                self._answered = True
                waiting = False
                try:
                    if reply is None:
                        return self._check_ack(request, got_body)
                    return (check or _pair)(got_body, got_fds)
                except BaseException:
                    _close_fds(got_fds)
                    raise
            except (ProtocolError, Disconnected, VhostUserTimeout) as exc:
                if exc.request is None:
                    exc.request = request
                self._broken = exc
                raise
            except BaseException as exc:
                if waiting:  # e.g. KeyboardInterrupt: the reply may still arrive later
                    self._broken = ProtocolError("%s: interrupted while waiting for the reply "
                                                 "(%s)" % (request.name, type(exc).__name__),
                                                 request)
                raise

    @staticmethod
    def _check_ack(request, body):
        value = _U64.unpack(body)[0]
        if value:
            raise BackendError("%s: back-end replied with error %d" % (request.name, value),
                               request, value)

    def _receive_reply(self, channel, request, expect):
        # ``channel``, not self._channel: close() on another thread clears that.
        name = request.name
        code, flags, size, fds = channel.recv_header(name)
        try:
            if code != request:
                raise ProtocolError("%s: reply carries request code %d (%s)"
                                    % (name, code, _req_name(_as_frontend_req(code))))
            if flags != _VERSION | _FLAG_REPLY:
                raise ProtocolError("%s: reply flags %#x, expected 0x5 (version 1, reply)"
                                    % (name, flags))
            if size not in expect.sizes:
                raise ProtocolError("%s: reply size %d, expected %s"
                                    % (name, size, " or ".join(map(str, expect.sizes))))
            body = channel.recv_body(size, name)
            if len(fds) not in expect.fds:
                raise ProtocolError("%s: reply carries %d fd(s), expected %s"
                                    % (name, len(fds), " or ".join(map(str, expect.fds))))
        except BaseException:
            _close_fds(fds)
            raise
        return body, fds

    def _get_u64(self, request, valid=None, expected=""):
        """Send a payload-less request and return its u64 reply.

        ``valid(value)`` false makes the reply a ``ProtocolError`` that says
        the value was ``expected``.
        """
        def check(body, fds):
            value = _U64.unpack(body)[0]
            if valid is not None and not valid(value):
                raise ProtocolError("%s: reply value %d, expected %s"
                                    % (request.name, value, expected), request)
            return value
        return self._transact(request, reply=_REPLY_U64, check=check)

    def _set_u64(self, request, value, ack):
        _check_u64("value", value)
        self._transact(request, _U64.pack(value), ack=self._want_ack(request, ack))

    def _check_ring(self, request, index, fd_message=False):
        """Refuse a ring index a back-end could crash on (qsd 7.2 segfaults)."""
        limit = MAX_VRINGS
        if fd_message:
            limit = _VRING_IDX_MASK + 1  # the index has 8 bits in fd messages
        if self.queue_num is not None:
            limit = min(limit, self.queue_num)
        if not isinstance(index, int) or not 0 <= index < limit:
            raise ValueError("%s: ring index %r out of range 0..%d"
                             % (request.name, index, limit - 1))

    def _send_vring_fd(self, request, index, fd, ack):
        self._check_ring(request, index, fd_message=True)
        fds = () if fd is None else (_fileno(fd),)
        self._transact(request, _encode_vring_fd_index(index, bool(fds)), fds,
                       ack=self._want_ack(request, ack))

    # -- requests, in spec order ----------------------------------------------

    def get_features(self) -> int:
        """VHOST_USER_GET_FEATURES: the back-end's virtio features."""
        self.features = self._get_u64(_F.GET_FEATURES)
        return self.features

    def set_features(self, features: int, ack: _Ack = None) -> None:
        """VHOST_USER_SET_FEATURES: the features the driver accepted.

        Include PROTOCOL_FEATURES (bit 30) when the back-end offered it: old
        QEMU left it out and broke rust-vmm back-ends (rust-vmm/vhost#227).
        """
        if ack is None:  # QEMU waits for this one only while logging dirty pages
            ack = bool(features & VirtioFeature.LOG_ALL) and bool(
                self.protocol_features & _P.REPLY_ACK)
        self._set_u64(_F.SET_FEATURES, int(features), ack)
        self.acked_features = int(features)

    def set_owner(self, ack: _Ack = None) -> None:
        """VHOST_USER_SET_OWNER: start the session."""
        self._transact(_F.SET_OWNER, ack=self._want_ack(_F.SET_OWNER, ack))

    def reset_owner(self, ack: _Ack = None) -> None:
        """VHOST_USER_RESET_OWNER (deprecated): back-ends disable every ring."""
        self._transact(_F.RESET_OWNER, ack=self._want_ack(_F.RESET_OWNER, ack))

    def set_mem_table(self, regions: Sequence[Tuple[MemoryRegion, int]],
                      ack: _Ack = None) -> None:
        """VHOST_USER_SET_MEM_TABLE: the guest memory, one fd per region.

        Args:
            regions: (MemoryRegion, fd) pairs, as ``GuestMemory.regions()``
                returns them: 1 to 8. With CONFIGURE_MEM_SLOTS, ``add_mem_reg``
                adds more, up to ``max_mem_slots``.
        """
        regions = list(regions)
        # The spec's table has region0..region7, and QEMU and libvhost-user
        # size this message for 8 even with CONFIGURE_MEM_SLOTS (libvhost-user
        # drops a longer one as "too big"); QEMU adds the rest with ADD_MEM_REG.
        if not 1 <= len(regions) <= MAX_MEM_TABLE_REGIONS:
            raise ValueError("SET_MEM_TABLE: %d regions, one message carries 1..%d (add more "
                             "with add_mem_reg under CONFIGURE_MEM_SLOTS)"
                             % (len(regions), MAX_MEM_TABLE_REGIONS))
        _check_regions("SET_MEM_TABLE", [r for r, _ in regions])
        self._transact(_F.SET_MEM_TABLE, _encode_mem_table([r for r, _ in regions]),
                       [_fileno(fd) for _, fd in regions],
                       ack=self._want_ack(_F.SET_MEM_TABLE, ack))

    def set_log_base(self, mmap_size: int, mmap_offset: int = 0,
                     fd: Optional[int] = None) -> None:
        """VHOST_USER_SET_LOG_BASE: the dirty log (QEMU's 16-byte LOG payload).

        With LOG_SHMFD the fd is sent and a reply is mandatory; QEMU checks
        only its code, rust-vmm sends 16 bytes and QEMU's own test stub 0, so
        0, 8 and 16 bytes are all accepted (PROTOCOL.md 8.12).
        """
        body = _LOG.pack(mmap_size, mmap_offset)
        if self.protocol_features & _P.LOG_SHMFD:
            if fd is None:
                raise ValueError("SET_LOG_BASE: LOG_SHMFD is negotiated, an fd is required")
            self._transact(_F.SET_LOG_BASE, body, (_fileno(fd),), reply=_Reply((0, 8, 16)),
                           check=lambda body, fds: None)
        else:
            fds = () if fd is None else (_fileno(fd),)
            self._transact(_F.SET_LOG_BASE, body, fds)

    def set_log_fd(self, fd: int, ack: _Ack = None) -> None:
        """VHOST_USER_SET_LOG_FD: eventfd the back-end signals after logging."""
        self._transact(_F.SET_LOG_FD, b"", (_fileno(fd),),
                       ack=self._want_ack(_F.SET_LOG_FD, ack))

    def set_vring_num(self, index: int, num: int, ack: _Ack = None) -> None:
        """VHOST_USER_SET_VRING_NUM: the ring's size (a power of two <= 32768)."""
        self._check_ring(_F.SET_VRING_NUM, index)
        if not isinstance(num, int) or not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise ValueError("SET_VRING_NUM: ring size %r is not a power of two in 1..%d"
                             % (num, MAX_QUEUE_SIZE))
        self._transact(_F.SET_VRING_NUM, _STATE.pack(index, num),
                       ack=self._want_ack(_F.SET_VRING_NUM, ack))

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, log: int = 0,
                       flags: int = 0, ack: _Ack = None) -> None:
        """VHOST_USER_SET_VRING_ADDR: ring addresses in the front-end's address space.

        Without IOMMU_PLATFORM or GPA_ADDRESSES these are front-end user
        addresses (``GuestMemory.host_address``), not guest-physical ones.
        For a packed ring, desc is the descriptor ring, avail the driver
        event suppression area and used the device's (vhost-user.rst: the
        fields keep their split names). Flags bit 0 (VHOST_VRING_F_LOG)
        makes QEMU wait for the ack.
        """
        self._check_ring(_F.SET_VRING_ADDR, index)
        for name, value, align in (("desc", desc, 16), ("used", used, 4), ("avail", avail, 2)):
            _check_u64(name, value)
            if value % align:
                raise ValueError("SET_VRING_ADDR: %s address %#x is not %d-byte aligned"
                                 % (name, value, align))
        if flags & ~1:
            raise ValueError("SET_VRING_ADDR: only flag bit 0 (LOG) is defined, got %#x" % flags)
        if ack is None:
            ack = bool(flags & 1) and bool(self.protocol_features & _P.REPLY_ACK)
        self._transact(_F.SET_VRING_ADDR,
                       _encode_vring_addr(VringAddr(index, flags, desc, used, avail, log)),
                       ack=self._want_ack(_F.SET_VRING_ADDR, ack))

    def set_vring_base(self, index: int, base: int, ack: _Ack = None) -> None:
        """VHOST_USER_SET_VRING_BASE: the next avail index the back-end processes.

        Split rings: 16 bits. Packed rings: the avail position in bits 0-14
        and the driver's wrap counter in bit 15, the used position and its
        wrap counter in bits 16-31 (``Queue.vring_base`` holds it encoded).
        """
        self._check_ring(_F.SET_VRING_BASE, index)
        _check_u32("base", base)
        self._transact(_F.SET_VRING_BASE, _STATE.pack(index, base),
                       ack=self._want_ack(_F.SET_VRING_BASE, ack))

    def get_vring_base(self, index: int) -> int:
        """VHOST_USER_GET_VRING_BASE: stop the ring; returns its next avail index.

        The back-end drains in-flight requests first, which may take long.
        For a packed ring the answer is encoded as for SET_VRING_BASE (some
        back-ends leave the used half 0); ``Queue.reclaim`` decodes it.
        """
        return self._get_base(_F.GET_VRING_BASE, index)

    def _get_base(self, request, index):
        self._check_ring(request, index)

        def check(body, fds):
            state = VringState._make(_STATE.unpack(body))
            if state.index != index:
                raise ProtocolError("%s: reply is for ring %d, asked for ring %d"
                                    % (request.name, state.index, index), request)
            return state.num
        return self._transact(request, _STATE.pack(index, 0), reply=_REPLY_STATE, check=check)

    def set_vring_kick(self, index: int, fd: Optional[int], ack: _Ack = None) -> None:
        """VHOST_USER_SET_VRING_KICK: the kick eventfd (None: poll mode); starts the ring."""
        self._send_vring_fd(_F.SET_VRING_KICK, index, fd, ack)

    def set_vring_call(self, index: int, fd: Optional[int], ack: _Ack = None) -> None:
        """VHOST_USER_SET_VRING_CALL: the call eventfd (None: no interrupts)."""
        self._send_vring_fd(_F.SET_VRING_CALL, index, fd, ack)

    def set_vring_err(self, index: int, fd: Optional[int], ack: _Ack = None) -> None:
        """VHOST_USER_SET_VRING_ERR: the error eventfd (None: deregister)."""
        self._send_vring_fd(_F.SET_VRING_ERR, index, fd, ack)

    def get_protocol_features(self) -> ProtocolFeature:
        """VHOST_USER_GET_PROTOCOL_FEATURES: the back-end's protocol features.

        Always ask on a new connection, even when the answer is known: some
        back-ends only start acking after seeing it (rust-vmm/vhost#290).
        """
        self._needs_protocol_bit(_F.GET_PROTOCOL_FEATURES)
        return ProtocolFeature(self._get_u64(_F.GET_PROTOCOL_FEATURES))

    def set_protocol_features(self, features: int) -> None:
        """VHOST_USER_SET_PROTOCOL_FEATURES: the protocol features in use.

        Never acked: whether a back-end acks this very message is ambiguous
        (crosvm's back-end turns acking on while handling it).
        """
        self._needs_protocol_bit(_F.SET_PROTOCOL_FEATURES)
        _check_u64("features", int(features))
        self._transact(_F.SET_PROTOCOL_FEATURES, _U64.pack(int(features)))
        self.protocol_features = ProtocolFeature(int(features))

    def _needs_protocol_bit(self, request):
        if self.features is not None and not self.features & VirtioFeature.PROTOCOL_FEATURES:
            raise FeatureNotNegotiated("%s: the back-end did not offer PROTOCOL_FEATURES "
                                       "(bit 30) in GET_FEATURES" % request.name, request)

    def get_queue_num(self) -> int:
        """VHOST_USER_GET_QUEUE_NUM: how many queues the back-end supports (MQ)."""
        self._require(_F.GET_QUEUE_NUM)
        value = self._get_u64(_F.GET_QUEUE_NUM, lambda v: 0 < v <= MAX_VRINGS,
                              "a queue count in 1..%d" % MAX_VRINGS)
        self.queue_num = value
        return value

    def set_vring_enable(self, index: int, enable: bool, ack: _Ack = None) -> None:
        """VHOST_USER_SET_VRING_ENABLE: enable (True) or disable a started ring.

        Only legal once PROTOCOL_FEATURES (bit 30) was acked with SET_FEATURES
        (spec "Ring states"); QEMU waits for its ack.
        """
        self._check_ring(_F.SET_VRING_ENABLE, index)
        if not (self.acked_features or 0) & VirtioFeature.PROTOCOL_FEATURES:
            raise FeatureNotNegotiated("SET_VRING_ENABLE needs PROTOCOL_FEATURES (bit 30) "
                                       "acked with SET_FEATURES first", _F.SET_VRING_ENABLE)
        self._transact(_F.SET_VRING_ENABLE, _STATE.pack(index, 1 if enable else 0),
                       ack=self._want_ack(_F.SET_VRING_ENABLE, ack))

    def send_rarp(self, mac: bytes) -> None:
        """VHOST_USER_SEND_RARP: broadcast a RARP for ``mac`` (6 bytes). No reply."""
        self._require(_F.SEND_RARP)
        mac = bytes(mac)
        if len(mac) != 6:
            raise ValueError("SEND_RARP: a MAC address is 6 bytes, got %d" % len(mac))
        self._transact(_F.SEND_RARP, mac + b"\0\0")

    def net_set_mtu(self, mtu: int, ack: _Ack = None) -> None:
        """VHOST_USER_NET_SET_MTU: the MTU the driver uses."""
        self._require(_F.NET_SET_MTU)
        self._set_u64(_F.NET_SET_MTU, mtu, ack)

    def set_backend_req_fd(self, fd: int, ack: _Ack = None) -> None:
        """VHOST_USER_SET_BACKEND_REQ_FD: our end of the back-end request channel."""
        self._require(_F.SET_BACKEND_REQ_FD)
        self._transact(_F.SET_BACKEND_REQ_FD, b"", (_fileno(fd),),
                       ack=self._want_ack(_F.SET_BACKEND_REQ_FD, ack))

    def iotlb_msg(self, msg: IotlbMsg) -> None:
        """VHOST_USER_IOTLB_MSG: an IOTLB update or invalidation (always acked)."""
        self._require(_F.IOTLB_MSG)
        self._transact(_F.IOTLB_MSG, _encode_iotlb(IotlbMsg(*msg)), ack=True)

    def set_vring_endian(self, index: int, big_endian: bool) -> None:
        """VHOST_USER_SET_VRING_ENDIAN: legacy ring endianness. No reply."""
        self._require(_F.SET_VRING_ENDIAN)
        self._check_ring(_F.SET_VRING_ENDIAN, index)
        self._transact(_F.SET_VRING_ENDIAN, _STATE.pack(index, 1 if big_endian else 0))

    def get_config(self, offset: int, size: int, flags: int = CONFIG_FLAG_WRITABLE) -> bytes:
        """VHOST_USER_GET_CONFIG: ``size`` bytes of device config at ``offset``.

        Raises:
            BackendError: the back-end answered with size 0 (its error reply).
        """
        self._require(_F.GET_CONFIG)
        _check_config_window("GET_CONFIG", offset, size)
        request = _encode_config(DeviceConfig(offset, flags, bytes(size)))

        def check(body, fds):
            # libvhost-user refuses with an empty payload, not a CONFIG header
            # of size 0 (vu_get_config sets the reply size to 0): both mean "error".
            config = _decode_config(_F.GET_CONFIG, body) if body else None
            if config is None or not config.data:
                raise BackendError("GET_CONFIG: back-end refused to read %d bytes at offset %d"
                                   % (size, offset), _F.GET_CONFIG, 0)
            if config.offset != offset:
                raise ProtocolError("GET_CONFIG: reply offset %d, asked for %d"
                                    % (config.offset, offset), _F.GET_CONFIG)
            return config.data
        return self._transact(_F.GET_CONFIG, request, check=check,
                              reply=_Reply((_CONFIG_HDR.size + size, _CONFIG_HDR.size, 0)))

    def set_config(self, offset: int, data: _Buffer, flags: int = CONFIG_FLAG_WRITABLE,
                   ack: _Ack = None) -> None:
        """VHOST_USER_SET_CONFIG: write ``data`` into the device config at ``offset``."""
        self._require(_F.SET_CONFIG)
        data = bytes(data)
        _check_config_window("SET_CONFIG", offset, len(data))
        self._transact(_F.SET_CONFIG, _encode_config(DeviceConfig(offset, flags, data)),
                       ack=self._want_ack(_F.SET_CONFIG, ack))

    def create_crypto_session(self, session: _Buffer) -> bytes:
        """VHOST_USER_CREATE_CRYPTO_SESSION: QEMU's session struct in, the same out."""
        self._require(_F.CREATE_CRYPTO_SESSION)
        session = bytes(session)
        body, _ = self._transact(_F.CREATE_CRYPTO_SESSION, session,
                                 reply=_Reply((len(session),)))
        return body

    def close_crypto_session(self, session_id: int) -> None:
        """VHOST_USER_CLOSE_CRYPTO_SESSION. No reply."""
        self._require(_F.CLOSE_CRYPTO_SESSION)
        _check_u64("session_id", session_id)
        self._transact(_F.CLOSE_CRYPTO_SESSION, _U64.pack(session_id))

    def postcopy_advise(self) -> int:
        """VHOST_USER_POSTCOPY_ADVISE: the back-end's userfaultfd (caller closes it)."""
        self._require(_F.POSTCOPY_ADVISE)
        _, fds = self._transact(_F.POSTCOPY_ADVISE, reply=_Reply((0, 8), (1,)))
        return fds[0]

    def postcopy_listen(self, ack: _Ack = None) -> None:
        """VHOST_USER_POSTCOPY_LISTEN."""
        self._require(_F.POSTCOPY_LISTEN)
        self._transact(_F.POSTCOPY_LISTEN, ack=self._want_ack(_F.POSTCOPY_LISTEN, ack))

    def postcopy_end(self) -> int:
        """VHOST_USER_POSTCOPY_END: the back-end's result (0 = ok)."""
        self._require(_F.POSTCOPY_END)
        return self._get_u64(_F.POSTCOPY_END)

    def get_inflight_fd(self, num_queues: int,
                        queue_size: int) -> Tuple[InflightInfo, Optional[int]]:
        """VHOST_USER_GET_INFLIGHT_FD: (InflightInfo, fd or None); caller closes the fd."""
        self._require(_F.GET_INFLIGHT_FD)
        def check(body, fds):
            info = _decode_inflight(_F.GET_INFLIGHT_FD, body)
            if bool(info.mmap_size) != bool(fds):
                raise ProtocolError("GET_INFLIGHT_FD: mmap_size %d with %d fd(s)"
                                    % (info.mmap_size, len(fds)), _F.GET_INFLIGHT_FD)
            # libvhost-user and DPDK answer in the request's own buffer, so
            # both counts come back as asked; other ones describe another buffer.
            for field, asked in (("num_queues", num_queues), ("queue_size", queue_size)):
                if info.mmap_size and getattr(info, field) != asked:
                    raise ProtocolError("GET_INFLIGHT_FD: %s %d in the reply, %d was asked for"
                                        % (field, getattr(info, field), asked),
                                        _F.GET_INFLIGHT_FD)
            return info, (fds[0] if fds else None)
        return self._transact(
            _F.GET_INFLIGHT_FD, _encode_inflight(InflightInfo(0, 0, num_queues, queue_size)),
            reply=_Reply((_INFLIGHT.size,), (0, 1)), check=check)

    def set_inflight_fd(self, info: InflightInfo, fd: int, ack: _Ack = None) -> None:
        """VHOST_USER_SET_INFLIGHT_FD: hand the inflight buffer back (reconnect)."""
        self._require(_F.SET_INFLIGHT_FD)
        self._transact(_F.SET_INFLIGHT_FD, _encode_inflight(InflightInfo(*info)),
                       (_fileno(fd),), ack=self._want_ack(_F.SET_INFLIGHT_FD, ack))

    def gpu_set_socket(self, fd: int) -> None:
        """VHOST_USER_GPU_SET_SOCKET: the vhost-user-gpu side channel. No reply."""
        self._transact(_F.GPU_SET_SOCKET, b"", (_fileno(fd),))

    def reset_device(self, ack: _Ack = None) -> None:
        """VHOST_USER_RESET_DEVICE: reset the whole device."""
        self._require(_F.RESET_DEVICE)
        self._transact(_F.RESET_DEVICE, ack=self._want_ack(_F.RESET_DEVICE, ack))

    def vring_kick(self, index: int, ack: _Ack = None) -> None:
        """VHOST_USER_VRING_KICK: an in-band kick (INBAND_NOTIFICATIONS)."""
        self._require(_F.VRING_KICK)
        self._check_ring(_F.VRING_KICK, index)
        self._transact(_F.VRING_KICK, _STATE.pack(index, 0),
                       ack=self._want_ack(_F.VRING_KICK, ack))

    def get_max_mem_slots(self) -> int:
        """VHOST_USER_GET_MAX_MEM_SLOTS: how many regions the back-end can hold."""
        self._require(_F.GET_MAX_MEM_SLOTS)
        value = self._get_u64(_F.GET_MAX_MEM_SLOTS, bool, "at least 1")
        self.max_mem_slots = value
        return value

    def add_mem_reg(self, region: MemoryRegion, fd: int, ack: _Ack = None) -> None:
        """VHOST_USER_ADD_MEM_REG: add one region (exactly one fd)."""
        self._require(_F.ADD_MEM_REG)
        _check_regions("ADD_MEM_REG", [MemoryRegion(*region)])
        self._transact(_F.ADD_MEM_REG, _encode_mem_region(MemoryRegion(*region)),
                       (_fileno(fd),), ack=self._want_ack(_F.ADD_MEM_REG, ack))

    def rem_mem_reg(self, region: MemoryRegion, ack: _Ack = None) -> None:
        """VHOST_USER_REM_MEM_REG: remove the region with this gpa, uaddr and size."""
        self._require(_F.REM_MEM_REG)
        self._transact(_F.REM_MEM_REG, _encode_mem_region(MemoryRegion(*region)),
                       ack=self._want_ack(_F.REM_MEM_REG, ack))

    def set_status(self, status: int, ack: _Ack = None) -> None:
        """VHOST_USER_SET_STATUS: the virtio device status byte."""
        self._require(_F.SET_STATUS)
        if not 0 <= status <= 0xFF:
            raise ValueError("SET_STATUS: status %r is not a byte" % (status,))
        self._set_u64(_F.SET_STATUS, status, ack)

    def get_status(self) -> int:
        """VHOST_USER_GET_STATUS: the virtio device status byte."""
        self._require(_F.GET_STATUS)
        return self._get_u64(_F.GET_STATUS, lambda v: v <= 0xFF, "a status byte")

    def get_shared_object(self, uuid: bytes) -> int:
        """VHOST_USER_GET_SHARED_OBJECT: the dma-buf fd for a 16-byte UUID (caller closes it)."""
        self._require(_F.GET_SHARED_OBJECT)
        uuid = bytes(uuid)
        if len(uuid) != _UUID_SIZE:
            raise ValueError("GET_SHARED_OBJECT: a UUID is 16 bytes, got %d" % len(uuid))
        def check(body, fds):
            value = _U64.unpack(body)[0] if body else 0
            if value or not fds:
                raise BackendError("GET_SHARED_OBJECT: back-end has no object for that UUID "
                                   "(value %d)" % value, _F.GET_SHARED_OBJECT, value)
            return fds[0]
        return self._transact(_F.GET_SHARED_OBJECT, uuid, reply=_Reply((0, 8), (0, 1)),
                              check=check)

    def set_device_state_fd(self, direction: int, phase: int, fd: int) -> Optional[int]:
        """VHOST_USER_SET_DEVICE_STATE_FD: start a state transfer over ``fd``.

        Returns an fd the back-end wants used instead (the caller then closes
        its own end and owns this one), or None.

        Raises:
            BackendError: the back-end refused (bits 0-7 of its reply).
        """
        self._require(_F.SET_DEVICE_STATE_FD)
        if direction not in (TRANSFER_SAVE, TRANSFER_LOAD) or phase != TRANSFER_PHASE_STOPPED:
            raise ValueError("SET_DEVICE_STATE_FD: direction %r / phase %r not defined"
                             % (direction, phase))
        def check(body, fds):
            value = _U64.unpack(body)[0]
            error = value & 0xFF
            no_fd = bool(value & _DEVICE_STATE_NO_FD)
            if value & ~0x1FF or (fds and (error or no_fd)) or not (fds or no_fd or error):
                raise ProtocolError("SET_DEVICE_STATE_FD: reply value %#x with %d fd(s)"
                                    % (value, len(fds)), _F.SET_DEVICE_STATE_FD)
            if error:
                raise BackendError("SET_DEVICE_STATE_FD: back-end refused the transfer "
                                   "(error %d)" % error, _F.SET_DEVICE_STATE_FD, error)
            return fds[0] if fds else None
        return self._transact(_F.SET_DEVICE_STATE_FD, _XFER.pack(direction, phase),
                              (_fileno(fd),), reply=_Reply((_U64.size,), (0, 1)), check=check)

    def check_device_state(self) -> None:
        """VHOST_USER_CHECK_DEVICE_STATE: raise BackendError unless the transfer succeeded."""
        self._require(_F.CHECK_DEVICE_STATE)
        value = self._get_u64(_F.CHECK_DEVICE_STATE)
        if value:
            raise BackendError("CHECK_DEVICE_STATE: back-end reports the state transfer "
                               "failed (%d)" % value, _F.CHECK_DEVICE_STATE, value)

    def get_shmem_config(self) -> ShmemConfig:
        """VHOST_USER_GET_SHMEM_CONFIG: the device's shared memory regions."""
        self._require(_F.GET_SHMEM_CONFIG)
        return self._transact(_F.GET_SHMEM_CONFIG, reply=_Reply((_SHMCFG.size,)),
                              check=lambda body, fds: _decode_shmem_config(_F.GET_SHMEM_CONFIG,
                                                                           body))

    def get_vring_base_skip_drain(self, index: int) -> int:
        """VHOST_USER_GET_VRING_BASE_SKIP_DRAIN: stop the ring without draining it."""
        self._require(_F.GET_VRING_BASE_SKIP_DRAIN)
        return self._get_base(_F.GET_VRING_BASE_SKIP_DRAIN, index)


def _pair(body, fds):
    return body, fds


def _as_frontend_req(code):
    try:
        return FrontendReq(code)
    except ValueError:
        return code


def _fileno(fd):
    """An int fd from an int or anything with ``fileno()``."""
    value = fd if isinstance(fd, int) else fd.fileno()
    if value < 0:
        raise ValueError("invalid file descriptor %r" % (fd,))
    return value


def _check_config_window(what, offset, size):
    if not isinstance(offset, int) or not isinstance(size, int) or offset < 0 or size < 1 \
            or offset + size > MAX_CONFIG_SIZE:
        raise ValueError("%s: offset %r + size %r must lie within the %d-byte config space"
                         % (what, offset, size, MAX_CONFIG_SIZE))


def _check_regions(what, regions):
    """No empty region, no overlap in guest-physical or user address (spec)."""
    for region in regions:
        if region.memory_size <= 0:
            raise ValueError("%s: region at %#x has size %d"
                             % (what, region.guest_phys_addr, region.memory_size))
        for name, value in zip(region._fields, region):
            _check_u64(name, value)
    for key in ("guest_phys_addr", "userspace_addr"):
        spans = sorted((getattr(r, key), getattr(r, key) + r.memory_size) for r in regions)
        for (start_a, end_a), (start_b, _) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise ValueError("%s: regions overlap in %s: %#x-%#x and %#x"
                                 % (what, key, start_a, end_a, start_b))


############################################################################
# GuestMemory ##############################################################
############################################################################

_PAGE_SIZE = mmap.PAGESIZE


class _Region:
    """One memfd-backed shared mapping at a guest-physical address."""

    def __init__(self, guest_addr, size, name):
        self.guest_addr = guest_addr
        self.size = size
        self.fd = _memfd_create(name, size)
        try:
            self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.address, self._anchor = _mapping_address(self.map)
        self.view = memoryview(self.map)

    def close(self):
        if self.fd < 0:
            return
        self.view.release()
        self._anchor = None
        try:
            self.map.close()
        except BufferError:
            # A caller still holds a view: leave the mapping to the GC rather
            # than crash; it stays valid, so nothing can fault on it.
            _log.warning("guest memory at %#x still has exported views", self.guest_addr)
        os.close(self.fd)
        self.fd = -1


class GuestMemory:
    """Guest RAM for a back-end: memfd-backed shared mappings at guest addresses.

    One memfd per region, mapped whole at offset 0, so each region is one
    SET_MEM_TABLE entry with ``mmap_offset`` 0. Each memfd is sealed against
    shrinking: a back-end cannot truncate it and make us fault. The region's
    real mapping address is its ``userspace_addr``; ring addresses are given
    to the back-end in that space (``host_address``), descriptor addresses in
    guest-physical space.

    Includes a first-fit allocator (``allocate``/``free``) for rings and
    buffers. Out-of-range access raises ``ValueError`` naming the address.

    Args:
        layout: (guest_addr, size) pairs; sizes are rounded up to pages.
    """

    def __init__(self, layout: Iterable[Tuple[int, int]],
                 name: str = "vhost-user-guest") -> None:
        self._regions = []
        self._free = {}
        self._allocated = {}
        self._lock = threading.Lock()
        try:
            for guest_addr, size in layout:
                if guest_addr % _PAGE_SIZE or size <= 0:
                    raise ValueError("region (%#x, %r): guest address must be page aligned "
                                     "and size positive" % (guest_addr, size))
                size = -(-size // _PAGE_SIZE) * _PAGE_SIZE
                region = _Region(guest_addr, size, name)
                self._regions.append(region)
                self._free[region.guest_addr] = [(guest_addr, guest_addr + size)]
            if not self._regions:
                raise ValueError("guest memory needs at least one region")
            self._regions.sort(key=lambda r: r.guest_addr)
            for a, b in zip(self._regions, self._regions[1:]):
                if b.guest_addr < a.guest_addr + a.size:
                    raise ValueError("regions at %#x and %#x overlap"
                                     % (a.guest_addr, b.guest_addr))
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        """Total bytes of guest RAM (0 once closed)."""
        return sum(r.size for r in self._regions or ())

    def regions(self) -> List[Tuple[MemoryRegion, int]]:
        """(MemoryRegion, fd) per region, as SET_MEM_TABLE and ADD_MEM_REG want them."""
        self._check_open()
        return [(MemoryRegion(r.guest_addr, r.size, r.address, 0), r.fd) for r in self._regions]

    def region_for(self, guest_addr: int) -> MemoryRegion:
        """The MemoryRegion that contains ``guest_addr``."""
        region = self._find(guest_addr, 1)
        return MemoryRegion(region.guest_addr, region.size, region.address, 0)

    def _find(self, guest_addr, length):
        self._check_open()
        if isinstance(guest_addr, int) and isinstance(length, int) and length >= 0:
            for region in self._regions:
                offset = guest_addr - region.guest_addr
                if 0 <= offset and offset + length <= region.size and \
                        (length or offset < region.size):
                    return region
        raise ValueError("guest address range %s + %r is not inside one region of "
                         "guest memory" % (_hex(guest_addr), length))

    def _check_open(self):
        if self._regions is None:
            raise ValueError("guest memory is closed")

    def host_address(self, guest_addr: int) -> int:
        """This process's virtual address of ``guest_addr`` (the vhost-user uaddr)."""
        region = self._find(guest_addr, 1)
        return region.address + guest_addr - region.guest_addr

    def view(self, guest_addr: int, length: int) -> memoryview:
        """A zero-copy writable memoryview of ``length`` bytes at ``guest_addr``."""
        region = self._find(guest_addr, length)
        offset = guest_addr - region.guest_addr
        return region.view[offset:offset + length]

    def read(self, guest_addr: int, length: int) -> bytes:
        """Copy ``length`` bytes out of guest memory."""
        return bytes(self.view(guest_addr, length))

    def write(self, guest_addr: int, data: _Buffer) -> None:
        """Copy ``data`` into guest memory at ``guest_addr``."""
        data = memoryview(data).cast("B")
        self.view(guest_addr, len(data))[:] = data

    def allocate(self, size: int, align: int = 16) -> int:
        """Reserve ``size`` bytes aligned to ``align``; returns the guest address.

        Raises:
            MemoryError: no region has a free block that large.
        """
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError("allocate(%r, align=%r): size must be positive and align a "
                             "power of two" % (size, align))
        self._check_open()
        with self._lock:
            for region in self._regions:
                blocks = self._free[region.guest_addr]
                for i, (start, end) in enumerate(blocks):
                    addr = (start + align - 1) & ~(align - 1)
                    if addr + size <= end:
                        pieces = [(s, e) for s, e in ((start, addr), (addr + size, end)) if e > s]
                        blocks[i:i + 1] = pieces
                        self._allocated[addr] = size
                        return addr
        raise MemoryError("guest memory has no free block of %d bytes (align %d)"
                          % (size, align))

    def free(self, guest_addr: int) -> None:
        """Return a block from ``allocate`` to the free list."""
        with self._lock:
            size = self._allocated.pop(guest_addr, None)
            if size is None:
                raise ValueError("free(%s): not an allocated block" % _hex(guest_addr))
            region = self._find(guest_addr, size)
            blocks = self._free[region.guest_addr]
            blocks.append((guest_addr, guest_addr + size))
            blocks.sort()
            merged = [blocks[0]]
            for start, end in blocks[1:]:
                if start == merged[-1][1]:
                    merged[-1] = (merged[-1][0], end)
                else:
                    merged.append((start, end))
            blocks[:] = merged

    def close(self) -> None:
        """Unmap and close every region; safe to call twice."""
        regions, self._regions = self._regions, None
        for region in regions or ():
            region.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self._regions is None:
            return "<GuestMemory closed>"
        return "<GuestMemory %s>" % ", ".join(
            "%#x+%#x" % (r.guest_addr, r.size) for r in self._regions)


def _hex(value):
    return "%#x" % value if isinstance(value, int) else repr(value)


############################################################################
# Queue ####################################################################
############################################################################

# The driver side of a split virtqueue (its layout is in Wire format, the
# accessors and fences that keep it consistent across CPUs in OS primitives),
# and the batch seam every device's fast path uses.

#: Seconds a completion wait polls used->idx before sleeping on the call
#: eventfd: polling briefly spares a slow cross-vCPU wake-up (BACKENDS.md 6).
_DEFAULT_SPIN = 50e-6
#: The ceiling of an adaptive spin (``Queue.spin_max``): a back-end slower
#: than this to answer is slept for, as the kernel's halt-polling does.
_SPIN_MAX = 1e-3
#: Freed bounce blocks up to this size are kept for reuse by the next chain of
#: the same size (requests repeat sizes), sparing the guest allocator.
_SPARE_BLOCK_MAX = 64 << 10


class _Chain:
    """Driver bookkeeping for one chain in flight (never read back from the ring)."""

    __slots__ = ("token", "descs", "writable", "copy_out", "block", "block_size")

    def __init__(self, token, descs, writable, copy_out, block, block_size):
        self.token = token
        self.descs = descs          # split: descriptor indices to free; packed: descriptors
        self.writable = writable    # bytes the device may write
        self.copy_out = copy_out    # (guest_addr, caller buffer) to copy back
        self.block = block          # guest allocation (bounce + indirect) or None
        self.block_size = block_size


class _QueueFull(VhostUserError):
    """The ring has no free descriptor for the chain: reap used entries and retry."""


def _used_entries(words):
    """The bytes of used elements, given as [id, len, id, len, ...] (spec 2.7.8)."""
    return struct.pack("<%dI" % len(words), *words)


# A burst's lengths are often all one value (equal frames; what whole
# buffers report). list.count of one small int is a C loop of identity
# tests, several times quicker than min() or max() on CPython.

def _smallest(values):
    """min() of a non-empty list; one C-level count when all are equal."""
    first = values[0]
    return first if values.count(first) == len(values) else min(values)


def _largest(values):
    """max() of a non-empty list; one C-level count when all are equal."""
    first = values[0]
    return first if values.count(first) == len(values) else max(values)


class _SlotBatch:
    """A run of consecutive fast-path slots, posted and reaped whole (``Queue._post_slot_batch``,
    ``Queue._reap_whole_batch``).

    ``heads`` sorted; ``heads_slice`` a slice that selects them when they
    are evenly spaced (then their queue tokens are set and cleared with one
    slice step each), else None, and ``in_order`` when slot k's head grows
    with k; ``writable`` the used length every one of them must report,
    ``used`` the bytes of the used entries the device wrote for it last
    time (at first, in slot order); ``run`` its slots as a list (their
    queue tokens), ``slots`` the slice of the per-slot lists they are,
    ``head_array`` their heads in slot order.
    """

    __slots__ = ("count", "heads", "writable", "heads_slice", "in_order", "nones", "used",
                 "run", "slots", "head_array")

    def __init__(self, slots, start, count):
        queue = slots.queue
        by_slot = slots.head_array[start:start + count].tolist()
        self.count = count
        self.heads = sorted(by_slot)
        self.writable = queue._slot_writable[by_slot[0]]
        step = self.heads[1] - self.heads[0] if count > 1 else 1
        even = step > 0 and self.heads == list(range(self.heads[0],
                                                     self.heads[0] + step * count, step))
        self.heads_slice = slice(self.heads[0], self.heads[-1] + 1, step) if even else None
        self.in_order = even and by_slot == self.heads
        self.nones = [None] * count
        self.run = slots.run[start:start + count]
        self.slots = slice(start, start + count)
        self.head_array = slots.head_array[start:start + count]
        self.used = _used_entries([x for head in by_slot for x in (head, self.writable)])

    @staticmethod
    def make(slots, start, count):
        """The batch of slots start..start+count-1, or None when their lengths differ.

        Kept in ``slots.batches`` until a slot changes.
        """
        writable = slots.queue._slot_writable
        lengths = [writable[head] for head in slots.head_array[start:start + count]]
        batch = _SlotBatch(slots, start, count) if lengths.count(lengths[0]) == count else None
        slots.batches[start, count] = batch
        return batch


class _SlotTable:
    """Slots a device built on ``queue``, numbered: slot k is queue head ``head_array[k]``.

    What ``_SlotBatch`` reads: ``run`` is range(count) as a list (a run
    k..k+n is ``run[k:k + n]``), ``batches`` the runs made batches so far.
    """

    __slots__ = ("queue", "head_array", "run", "batches")

    def __init__(self, queue, heads):
        self.queue = queue
        self.head_array = array.array("H", heads)
        self.run = list(range(len(heads)))
        self.batches = {}


#: Buffers of a chain: bytes-like ones go through bounce buffers, (guest_addr, length) do not.
_Buffers = Sequence[Union[bytes, bytearray, memoryview, Tuple[int, int]]]
#: Guest ranges (guest_addr, length) a slot is built from.
_Ranges = Sequence[Tuple[int, int]]
#: Reaped entries: (token, bytes the device wrote) each.
_Used = Sequence[Tuple[Any, int]]


# PyPy's tracing JIT compiles the path a loop took when the loop got hot. A
# polling loop that may stop after any look gets its hot path traced on a
# round that stops, and then unrolls the rounds that go on into a chain of
# bridges, one more every few hundred calls, without end: a program that
# polls spends more time compiling than running. So the polls look in runs
# of a fixed count, with no way out inside a run, and stop between runs
# (one look per run where there is no such JIT: CPython).
_TRACING_JIT = "pypyjit" in sys.builtin_module_names
_SPIN_RUN = range(16 if _TRACING_JIT else 1)


class Queue:
    """One virtqueue in guest memory, split or packed, and the driver that fills it.

    Holds what a VMM keeps per queue (crosvm's ``Queue``: size, guest
    addresses of the three parts, next avail and used indices, the interrupt
    vector, its kick and call events) and, since there is no guest, the
    virtio driver side: ``add`` posts a chain of driver-readable then
    device-writable buffers, ``notify`` kicks when the device wants it,
    ``get_used``/``wait_used`` reap completions.

    Buffers are either bytes-like objects, copied through a bounce buffer in
    guest memory (a writable object given as a device-writable buffer gets
    the device's bytes copied back when its chain is reaped), or
    ``(guest_addr, length)`` tuples: zero-copy regions of ``mem``.

    Everything read back from the used ring is checked; a device that names
    a chain that is not in flight, or claims to have written more than the
    chain's writable buffers hold, raises ``ProtocolError`` and leaves the
    queue broken (every later call raises it again) with its free list
    intact. Methods are thread-safe; waiting is done outside the lock.

    The fast path is slots: ``add_slot`` builds a chain of guest buffers
    once and keeps its descriptors, ``post_slots`` makes many available with
    one avail-index store, and ``get_used``/``wait_used`` return them like
    chains (with the token given at post). The split layout lives in
    ``_take_descs``, ``_write_chain``, ``_set_slot_buffer``, ``_publish`` and
    the bulk read in ``_reap_some``; a packed ring replaces those.

    Args:
        mem: the ``GuestMemory`` to allocate the ring in.
        size: number of entries, a power of two up to 32768.
        index: the queue's index in its device.
        vector: the interrupt vector (MSI-X style); None for the shared event.
        features: the negotiated virtio features; RING_EVENT_IDX and
            RING_INDIRECT_DESC change how the driver side works, and
            RING_PACKED picks the packed layout (fixed from construction).
            ``VhostUserFrontend.activate`` sets it to the acked features.
    """

    #: Raised by ``add`` when the ring is full: reap used entries and retry.
    Full = _QueueFull
    #: Chains of at least this many buffers go through one indirect table
    #: when RING_INDIRECT_DESC was negotiated (shorter ones too when the
    #: ring has too few free descriptors).
    indirect_threshold = 4
    #: True for the packed layout (virtio spec 2.8).
    packed = False

    _block = None  # type: Optional[int]
    _views = ()
    _packed_layout = None  # type: Optional[type]  # _PackedQueue, set in the Packed queue section

    def __new__(cls, mem, size, index=0, vector=None, features=0, lock=None):
        # The layout is fixed when the ring is allocated: RING_PACKED in
        # ``features`` builds the packed one (the next section registers it).
        if cls is Queue and features & VirtioFeature.RING_PACKED:
            cls = Queue._packed_layout
        return object.__new__(cls)

    def __init__(self, mem: GuestMemory, size: int, index: int = 0, vector: Optional[int] = None,
                 features: int = 0, lock: Optional[threading.Lock] = None) -> None:
        if not isinstance(size, int) or not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise ValueError("queue size %r is not a power of two in 1..%d"
                             % (size, MAX_QUEUE_SIZE))
        if sys.byteorder != "little":
            raise NotImplementedError("split rings are little-endian; this driver "
                                      "writes them in host order")
        self.mem = mem
        self.size = size
        self.index = index
        self.vector = index if vector is None else vector
        self.next_avail = 0
        self.next_used = 0
        self.vring_base = 0
        self.features = features
        self.spin = _DEFAULT_SPIN
        #: When above 0, ``spin`` adapts to the back-end (``wait_for_used``),
        #: up to this many seconds.
        self.spin_max = 0.0
        total = self._ring_bytes(size)
        self._block = mem.allocate(total, align=4096)
        self.kick = None
        self.call = None
        try:
            mem.view(self._block, total)[:] = bytes(total)
            self._map_rings(mem, size)
            self.kick = Event()
            self.call = Event()
        except BaseException:
            self.close()
            raise
        #: Guards the ring and the driver's record of it. A device passes its
        #: own (re-entrant) lock when it routes completions under the same one.
        self.lock = threading.Lock() if lock is None else lock
        self._fences = _Fences()
        self._free = list(range(size - 1, -1, -1))  # a stack: pop() gives 0 first
        self._chains = {}         # head descriptor -> _Chain
        self._spare = {}          # block size -> [freed bounce blocks]
        self._kicked = 0          # avail idx at the last notify decision
        self._serial = 0
        self._broken = None
        # Slots: chains built once and posted again and again (add_slot).
        self._slot_descs = {}                 # head -> its descriptors
        self._slot_writable = [0] * size      # head -> writable bytes of its chain
        self._slot_token = [None] * size      # head -> token while in flight
        self._slot_range = list(range(size))  # a run of heads h..h+n is _slot_range[h:h + n]
        self._slot_range_array = array.array("H", self._slot_range)   # the same, to publish
        self._slots_busy = 0
        # The one batch of slots in flight, when its poster vouched for it
        # (a _SlotBatch): reaped whole with list steps, not entry by entry.
        self._slot_batch = None
        # Until next_used reaches this avail index, entries between them may
        # have been used out of order (see _reap_in_order); None: in order.
        self._order_mark = None  # type: Optional[int]
        self._tracks_order = False   # reap_run is used: careful reaps check their order
        self._writable_all = -1   # the writable bytes every slot has (None: they differ)
        self._woken = False                   # wake_waiter() was called
        #: How many times ``rewind`` ran (a driver can tell a restart happened).
        self.rewinds = 0
        #: Ask for calls only when about to sleep in ``wait_used`` (EVENT_IDX):
        #: reaping does not re-arm used_event. For a driver that always waits
        #: through ``wait_used``; ``_placement`` says when it pays.
        self.defer_calls = False

    @staticmethod
    def _ring_bytes(size):
        desc_bytes, avail_bytes, used_bytes = _split_ring_sizes(size)
        return desc_bytes + avail_bytes + 2 + used_bytes

    def _map_rings(self, mem, size):
        """Place the three parts in the zeroed block and map views of them."""
        desc_bytes, avail_bytes, used_bytes = _split_ring_sizes(size)
        self.desc_table = self._block
        self.avail_ring = self.desc_table + desc_bytes
        self.used_ring = (self.avail_ring + avail_bytes + 3) & ~3
        self._desc = mem.view(self.desc_table, desc_bytes)
        # avail words: [0] flags, [1] idx, [2 + i] ring[i], [2 + size] used_event
        avail = mem.view(self.avail_ring, avail_bytes)
        self._avail = avail.cast("H")   # ring entries, written in bulk
        # used words: [0] flags, [1] idx, elements as (id, len) u32 pairs,
        # [2 + 4 * size] avail_event
        used = mem.view(self.used_ring, used_bytes)
        self._used_bytes = mem.view(self.used_ring + 4, 8 * size)
        self._used_elems = self._used_bytes.cast("I")
        self._load_used, _, used_words = _ring_words(used, "H")
        _, self._store_avail, avail_words = _ring_words(avail, "H")
        self._views = (self._desc, self._avail, self._used_elems, self._used_bytes, used_words,
                       avail_words, avail, used)

    @property
    def features(self) -> int:
        """The negotiated virtio features the driver side honours."""
        return self._features

    @features.setter
    def features(self, value: int) -> None:
        if bool(value & VirtioFeature.RING_PACKED) != self.packed:
            raise ValueError("queue %d has the %s layout, features %#x %s RING_PACKED; build "
                             "the queue with the features it will run with"
                             % (self.index, "packed" if self.packed else "split", value,
                                "lack" if self.packed else "have"))
        self._features = int(value)
        self._event_idx = bool(value & VirtioFeature.RING_EVENT_IDX)
        self._indirect = bool(value & VirtioFeature.RING_INDIRECT_DESC)

    @property
    def num_free(self) -> int:
        """Free descriptors in the ring."""
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Chains (slots included) posted and not yet reaped."""
        return len(self._chains) + self._slots_busy

    def used_index(self) -> int:
        """The device's used->idx as it is in guest memory now."""
        return self._load_used(1)

    def reclaim(self, base: int) -> None:
        """Take the queue back after the back-end stopped it (crosvm vhost_user_reclaim).

        ``base`` is GET_VRING_BASE's answer, the next avail index the back-end
        would have processed: it becomes ``vring_base``, where SET_VRING_BASE
        resumes the ring. Chains the back-end had not taken stay posted, and
        used entries not reaped yet stay to be reaped. Only an idle queue
        (nothing in flight) is re-based onto the back-end's indices: avail->idx
        and ``next_avail`` become ``base``, ``next_used`` the used index in
        guest memory (split rings do not return it).

        Raises:
            ProtocolError: ``base`` does not fit in 16 bits, or is ahead of
                what was posted or behind what is in flight.
        """
        if not 0 <= base <= 0xFFFF:
            raise ProtocolError("GET_VRING_BASE: base %#x does not fit in 16 bits" % base,
                                FrontendReq.GET_VRING_BASE)
        with self.lock:
            if self.in_flight:
                # Our avail->idx is the driver's and stays: the back-end has
                # taken the chains up to base, the rest it takes after wake.
                untaken = (self.next_avail - base) & 0xFFFF
                if untaken > self.in_flight:
                    raise ProtocolError("GET_VRING_BASE: base %d of queue %d, but avail->idx "
                                        "is %d with %d chain(s) in flight"
                                        % (base, self.index, self.next_avail,
                                           self.in_flight), FrontendReq.GET_VRING_BASE)
            else:
                self.next_avail = base
                self._store_avail(1, base)
                self.next_used = self.used_index()
            self.vring_base = self._kicked = base
            self._order_mark = self.next_avail

    def rewind(self,
               resubmitted: Optional[Callable[[int, Set[int]], Iterable[int]]] = None) -> int:
        """Offer every chain in flight again, oldest first; returns the new ``vring_base``.

        For a back-end that restarted and lost its ring state (crosvm has no
        equivalent; QEMU resumes a vhost-user-net ring at the used index).
        Used entries the old back-end published stay to be reaped. The avail
        ring from used->idx on is rewritten with the heads of the other
        chains in flight, in the order they were posted, so a back-end
        started with SET_VRING_BASE at the returned base (= used->idx, where
        it also writes its next used entry) takes each of them exactly once.
        avail->idx does not move: those chains are exactly the ones between
        used->idx and it.

        ``resubmitted(used_idx, waiting)``, when given, names the heads among
        ``waiting`` (the chains in flight not in the used ring) that the
        back-end resubmits by itself (INFLIGHT_SHMFD): they take the first
        avail entries from used->idx on, which such a back-end skips, so only
        the others are taken from the ring, and nothing runs twice.

        Raises:
            ProtocolError: the used ring names chains that are not in flight
                (the queue is broken).
        """
        with self.lock:
            self._check_usable()
            size = self.size
            mask = size - 1
            used_idx = self._load_used(1)
            completed = (used_idx - self.next_used) & 0xFFFF
            if completed > self.in_flight:
                self._fail("used->idx moved from %d to %d, but only %d chain(s) are in flight"
                           % (self.next_used, used_idx, self.in_flight))
            self._fences.read()
            done = set(self._used_elems[2 * ((self.next_used + i) & mask)]
                       for i in range(completed))
            waiting = set(head for head in self._chains if head not in done)
            waiting.update(head for head, token in enumerate(self._slot_token)
                           if token is not None and head not in done)
            if (used_idx + len(waiting)) & 0xFFFF != self.next_avail:
                self._fail("used entries %d..%d name %d chain(s) in flight, %d were expected"
                           % (self.next_used, used_idx, self.in_flight - len(waiting),
                              completed))
            # Posting order, read back from the avail ring: walking back from
            # avail->idx, the first entry naming a head is its latest posting.
            # A head no longer in the ring (posted more than ``size`` entries
            # ago, possible when the device completes out of order) is older
            # than all of them.
            found = {}
            position = self.next_avail
            for _ in range(size):
                position = (position - 1) & 0xFFFF
                head = self._avail[2 + (position & mask)]
                if head in waiting and head not in found:
                    found[head] = (self.next_avail - position) & 0xFFFF   # its age
            heads = [head for head in self._chains if head in waiting and head not in found]
            heads += [head for head in sorted(waiting) if head not in found
                      and head not in self._chains]
            heads += sorted(found, key=found.get, reverse=True)
            if resubmitted is not None:
                skipped = list(resubmitted(used_idx, waiting))
                skip = set(skipped)
                if not waiting.issuperset(skip) or len(skip) != len(skipped):
                    raise ValueError("rewind: resubmitted heads %r are not distinct chains in "
                                     "flight" % (skipped,))
                heads = skipped + [head for head in heads if head not in skip]
            for i, head in enumerate(heads):
                self._avail[2 + ((used_idx + i) & mask)] = head
            self._fences.write()
            self._store_avail(1, self.next_avail)
            # The new back-end is kicked once when its ring starts (start_kick).
            self._kicked = self.next_avail
            self.vring_base = used_idx
            self.rewinds += 1
            self._slot_batch = None
            self._order_mark = self.next_avail
            return used_idx

    # -- driver side: posting ---------------------------------------------------

    def add(self, readable: _Buffers = (), writable: _Buffers = (), token: Any = None) -> Any:
        """Post one chain: ``readable`` buffers for the device, then ``writable`` ones.

        The chain is published in the avail ring at once (a polling device
        may start on it); call ``notify()`` after one or many ``add`` calls.

        Args:
            readable: buffers the device reads, in order: bytes-like objects
                (copied) or ``(guest_addr, length)`` tuples (zero-copy).
            writable: buffers the device writes: writable bytes-like objects
                (filled when the chain is reaped) or ``(guest_addr, length)``.
            token: returned with the used entry; default a fresh int.

        Returns:
            The token.

        Raises:
            Queue.Full: not enough free descriptors now; reap and retry.
            ValueError: an empty or malformed buffer, or a chain longer than
                the queue (spec 2.7.5.3.1 forbids it even when indirect).
            ProtocolError: the queue is broken by an earlier bad used entry.
        """
        items, bounce, writable_bytes = self._describe(readable, writable)
        count = len(items)
        # Indirect when negotiated and the chain is long, or too long for the free ring
        # descriptors; decided before taking the lock, so re-checked under it.
        indirect = self._indirect and count > 1 and (
            count >= self.indirect_threshold or count > self.num_free)
        table_bytes = 16 * count if indirect else 0
        block = None
        block_size = table_bytes + bounce
        if block_size:
            # Bounce buffers and the indirect table share one allocation, filled
            # outside the lock so a big copy does not hold up other threads.
            block = self._allocate(block_size)
        try:
            addr = block + table_bytes if block is not None else 0
            resolved = []
            outs = []
            for gpa, length, flags, data in items:
                if gpa is None:  # a bounce buffer, carved in order from the block
                    gpa, addr = addr, addr + length
                    if flags & _DESC_F_WRITE:
                        outs.append((gpa, data))
                    else:
                        self.mem.write(gpa, data)
                resolved.append((gpa, length, flags))
            if indirect:
                table = self.mem.view(block, table_bytes)
                self._fill_table(table, resolved)
                table.release()
            with self.lock:
                self._check_usable()
                if (1 if indirect else count) > self.num_free:
                    raise _QueueFull("queue %d: chain of %d descriptors, %d free"
                                     % (self.index, count, self.num_free))
                if token is None:
                    self._serial += 1
                    token = self._serial
                self._post(resolved, indirect, block, table_bytes,
                           _Chain(token, None, writable_bytes, outs, block, block_size))
        except BaseException:
            if block is not None:
                self._release(block, block_size)
            raise
        return token

    @staticmethod
    def _fill_table(table, resolved):
        """Write an indirect table: the chain's descriptors linked by index."""
        last = len(resolved) - 1
        for i, (gpa, length, flags) in enumerate(resolved):
            _DESC.pack_into(table, 16 * i, gpa, length,
                            flags | (_DESC_F_NEXT if i < last else 0),
                            i + 1 if i < last else 0)

    def _allocate(self, size):
        spare = self._spare.get(size)
        if spare:
            try:
                return spare.pop()
            except IndexError:  # another thread took the last one
                pass
        try:
            return self.mem.allocate(size, align=16)
        except MemoryError:
            # Spare blocks kept for other sizes may be what fills guest memory.
            if not self._drop_spares():
                raise
            return self.mem.allocate(size, align=16)

    def _drop_spares(self):
        """Free every spare bounce block; True if there was one."""
        dropped = False
        for blocks in list(self._spare.values()):
            while blocks:
                try:
                    block = blocks.pop()
                except IndexError:  # another thread took the last one
                    break
                self.mem.free(block)
                dropped = True
        return dropped

    def _release(self, block, size):
        spare = self._spare.setdefault(size, []) if size <= _SPARE_BLOCK_MAX else None
        if spare is not None and len(spare) < self.size:
            spare.append(block)
        else:
            self.mem.free(block)

    def _post(self, resolved, indirect, block, table_bytes, chain):
        """Write the ring descriptors and publish the chain (under the lock)."""
        if indirect:
            descs = [self._free.pop()]
            _DESC.pack_into(self._desc, 16 * descs[0], block, table_bytes, _DESC_F_INDIRECT, 0)
        else:
            descs = self._take_descs(len(resolved))
            self._write_chain(descs, resolved)
        chain.descs = descs
        self._chains[descs[0]] = chain
        self._publish((descs[0],))

    # The layout-specific part of posting: which descriptors a chain uses,
    # how they are written, how heads are made available. A packed ring
    # (spec 2.8) replaces these three and the bulk read in _reap_some.

    def _take_descs(self, count):
        descs = self._free[-count:]
        descs.reverse()
        del self._free[-count:]
        return descs

    def _write_chain(self, descs, resolved):
        desc = self._desc
        last = len(descs) - 1
        for i, (gpa, length, flags) in enumerate(resolved):
            if i < last:
                _DESC.pack_into(desc, 16 * descs[i], gpa, length, flags | _DESC_F_NEXT,
                                descs[i + 1])
            else:
                _DESC.pack_into(desc, 16 * descs[i], gpa, length, flags, 0)

    def _publish(self, heads):
        """Make chains available: their avail entries in bulk, then avail->idx once."""
        count = len(heads)
        start = self.next_avail & (self.size - 1)
        end = start + count
        if count == 1:   # the accessor: a store through the cast view is slow on PyPy
            self._store_avail(2 + start, heads[0])
        else:
            if heads.__class__ is not array.array:
                heads = array.array("H", heads)
            if end <= self.size:
                self._avail[2 + start:2 + end] = heads
            else:   # the ring wraps
                split = self.size - start
                self._avail[2 + start:2 + self.size] = heads[:split]
                self._avail[2:2 + count - split] = heads[split:]
        self._fences.write()  # the entries and their descriptors before the index (spec 2.7.13)
        self.next_avail = new = (self.next_avail + count) & 0xFFFF
        self._store_avail(1, new)

    # -- driver side: slots (chains built once, posted many times) -------------

    def add_slot(self, readable: _Ranges = (), writable: _Ranges = ()) -> int:
        """Build a chain of guest buffers once, to post again and again; returns its slot.

        The fast path (as io_uring's fixed buffers): the slot keeps its
        descriptors, so posting it writes only the avail entry, and
        ``set_slot_buffer`` repoints one buffer of an idle slot. Buffers are
        ``(guest_addr, length)`` tuples. ``remove_slot`` gives the
        descriptors back.

        Raises:
            Queue.Full: fewer free descriptors than buffers.
            ValueError: a buffer that is not a guest range, or none.
        """
        items, bounce, writable_bytes = self._describe(readable, writable)
        if bounce:
            raise ValueError("queue %d: slot buffers are (guest_addr, length) tuples"
                             % self.index)
        with self.lock:
            self._check_usable()
            if len(items) > self.num_free:
                raise _QueueFull("queue %d: slot of %d descriptors, %d free"
                                 % (self.index, len(items), self.num_free))
            descs = self._take_descs(len(items))
            self._write_chain(descs, [(gpa, length, flags) for gpa, length, flags, _ in items])
            head = descs[0]
            self._slot_descs[head] = (descs, [length if flags else 0
                                              for _, length, flags, _ in items])
            self._slot_writable[head] = writable_bytes
            self._note_writable(writable_bytes)
        return head

    def set_slot_buffer(self, slot: int, position: int, guest_addr: int, length: int,
                        writable: bool = False) -> None:
        """Point buffer ``position`` of idle ``slot`` at another guest range."""
        with self.lock:
            self._check_usable()
            self._check_slot(slot, "set_slot_buffer")
            if not 0 <= position < len(self._slot_descs[slot][0]):
                raise ValueError("queue %d: slot %d has no buffer %r"
                                 % (self.index, slot, position))
            self.mem._find(guest_addr, length)
            if not 0 < length <= _MAX_DESC_LEN:
                raise ValueError("queue %d: buffer length %d is not in 1..%d"
                                 % (self.index, length, _MAX_DESC_LEN))
            self._set_slot_buffer(slot, position, guest_addr, length, writable)

    def _set_slot_buffer(self, slot, position, guest_addr, length, writable):
        descs, lengths = self._slot_descs[slot]
        if position + 1 < len(descs):
            flags, next_desc = _DESC_F_NEXT, descs[position + 1]
        else:
            flags, next_desc = 0, 0
        if writable:
            flags |= _DESC_F_WRITE
        _DESC.pack_into(self._desc, 16 * descs[position], guest_addr, length, flags, next_desc)
        lengths[position] = length if writable else 0
        self._slot_writable[slot] = sum(lengths)
        self._note_writable(self._slot_writable[slot])

    def _note_writable(self, writable):
        if self._writable_all != writable:
            self._writable_all = writable if self._writable_all == -1 else None

    def remove_slot(self, slot: int) -> None:
        """Give an idle slot's descriptors back for ``add``."""
        with self.lock:
            self._check_usable()
            self._check_slot(slot, "remove_slot")
            descs, _ = self._slot_descs.pop(slot)
            self._free.extend(reversed(descs))

    def post_slots(self, slots: Iterable[int], tokens: Optional[Iterable[Any]] = None) -> None:
        """Make idle slots available to the device in one go; call ``notify()`` after.

        Args:
            slots: slots from ``add_slot``, none of them in flight.
            tokens: what ``get_used`` returns for each (default the slot);
                not None.
        """
        slots = list(slots)
        tokens = slots if tokens is None else list(tokens)
        if len(tokens) != len(slots) or None in tokens:
            raise ValueError("queue %d: post_slots needs one token (not None) per slot"
                             % self.index)
        with self.lock:
            self._check_usable()
            for slot in slots:
                self._check_slot(slot, "post_slots")
            if len(set(slots)) != len(slots):
                raise ValueError("queue %d: post_slots: a slot is listed twice" % self.index)
            self._post_slots(slots, tokens)

    def _post_slots(self, slots, tokens):
        """post_slots without the checks, under the lock: for drivers in this module."""
        token_of = self._slot_token
        first, count = slots[0], len(slots)
        if count > 1 and slots[-1] - first == count - 1 \
                and slots == self._slot_range[first:first + count]:
            token_of[first:first + count] = tokens   # a run of slots: one step
            slots = self._slot_range_array[first:first + count]
        else:
            for slot, token in zip(slots, tokens):
                token_of[slot] = token
        self._slots_busy += count
        self._slot_batch = None
        self._publish(slots)

    def _post_slot_batch(self, batch, notify):
        """Post a ``_SlotBatch`` whose slots are all idle, under the lock; whether to kick.

        The fast path's post of a run of slots: ``_post_slots`` for the run
        (its tokens in one slice step when its heads are in order), then with
        ``notify`` the test of ``notify()``, the kick left to the caller.
        Vouched for as one batch (``_reap_whole_batch``) when no other slot
        is in flight.
        """
        if batch.in_order:
            self._slot_token[batch.heads_slice] = batch.run
        else:
            for head, k in zip(batch.head_array, batch.run):
                self._slot_token[head] = k
        self._slot_batch = None if self._slots_busy else batch
        self._slots_busy += batch.count
        self._publish(batch.head_array)
        return notify and self._kick_due()

    def _check_slot(self, slot, what):
        if not isinstance(slot, int) or slot not in self._slot_descs:
            raise ValueError("queue %d: %s: %r is not a slot" % (self.index, what, slot))
        if self._slot_token[slot] is not None:
            raise ValueError("queue %d: %s: slot %d is in flight" % (self.index, what, slot))

    def _describe(self, readable, writable):
        """Check the buffers: ([(gpa or None, length, flags, view)], bounce, writable)."""
        items = []
        bounce = 0
        writable_bytes = 0
        for flags, buffers in ((0, readable), (_DESC_F_WRITE, writable)):
            for buf in buffers:
                if isinstance(buf, tuple):
                    if len(buf) != 2:
                        raise ValueError("queue %d: a guest buffer is (guest_addr, length), "
                                         "got %r" % (self.index, buf))
                    gpa, length = buf
                    self.mem._find(gpa, length)  # ValueError when outside guest memory
                    view = None
                else:
                    view = memoryview(buf)
                    if flags and view.readonly:
                        raise ValueError("queue %d: a device-writable buffer must be "
                                         "writable, got a read-only %s"
                                         % (self.index, type(buf).__name__))
                    if view.format != "B" or view.ndim != 1:
                        view = view.cast("B")
                    length = len(view)
                    gpa = None
                    bounce += length
                if not 0 < length <= _MAX_DESC_LEN:
                    raise ValueError("queue %d: buffer length %d is not in 1..%d"
                                     % (self.index, length, _MAX_DESC_LEN))
                if flags:
                    writable_bytes += length
                items.append((gpa, length, flags, view))
        if not items:
            raise ValueError("queue %d: a chain needs at least one buffer" % self.index)
        if len(items) > self.size:
            raise ValueError("queue %d: chain of %d buffers is longer than the queue (%d)"
                             % (self.index, len(items), self.size))
        return items, bounce, writable_bytes

    def notify(self, force: bool = False) -> bool:
        """Kick the device about chains added since the last call, if it wants kicks.

        Honours VRING_USED_F_NO_NOTIFY, or with RING_EVENT_IDX the device's
        avail_event (spec 2.7.10); a packed ring, its device event
        suppression area (2.8.10). Posting many chains and notifying once is
        the batch path.

        Returns:
            True when the kick eventfd was signalled.
        """
        with self.lock:
            wanted = self._kick_due(force)
        if wanted:
            self.kick.signal()
        return wanted

    def _kick_due(self, force=False):
        """notify() under the lock, but the kick itself: whether the device wants one."""
        new, old = self.next_avail, self._kicked
        self._kicked = new
        if new == old and not force:
            return False
        self._fences.full()  # avail->idx visible before we read the device's wish
        if force:
            return True
        if self._event_idx:   # _need_event spelled out: every batch comes here
            return (new - self._load_used(2 + 4 * self.size) - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self._load_used(0) & _USED_F_NO_NOTIFY

    # -- driver side: reaping ----------------------------------------------------

    def get_used(self, limit: Optional[int] = None) -> _Used:
        """Reap what the device has used so far: a list of (token, written length).

        Never blocks. Device-writable bounce buffers have been copied back
        into the caller's objects, and the chain's descriptors and guest
        memory are free again, by the time an entry is returned.

        Raises:
            ProtocolError: a used entry names a descriptor out of range or not
                at the head of a chain in flight, claims more bytes than the
                chain's writable buffers, or the device moved used->idx by
                more than the ring holds. The queue stays broken.
        """
        with self.lock:
            self._check_usable()
            return self._reap(limit)

    def _reap(self, limit):
        done = []
        while True:
            more = self._reap_some(None if limit is None else limit - len(done), done)
            if not more or not self._event_idx or self.defer_calls \
                    or limit is not None and len(done) >= limit:
                return done
            # Re-arm for the next entry, as Linux's virtqueue_get_buf does: a
            # used_event left behind would silence the device's interrupts
            # until used->idx wraps (spec 2.7.10). Then look again, for an
            # entry used before the device could see the new used_event.
            # (With defer_calls, wait_used arms before it sleeps instead.)
            self._rearm()

    def _rearm(self):
        """Ask for an interrupt at the next used entry, then fence (EVENT_IDX)."""
        self._request_interrupt(0)
        self._fences.full()

    def _request_interrupt(self, ahead):
        """used_event: interrupt once the entry ``ahead`` past the next to reap is used."""
        self._store_avail(2 + self.size, (self.next_used + ahead) & 0xFFFF)

    def _reap_some(self, limit, done):
        self._slot_batch = None   # entry by entry from now on
        used_idx = self._load_used(1)
        next_used = self.next_used
        pending = (used_idx - next_used) & 0xFFFF
        if not pending:
            return False
        if pending > self.in_flight:
            self._fail("used->idx moved from %d to %d, but only %d chain(s) are in flight"
                       % (next_used, used_idx, self.in_flight))
        if limit is not None:
            pending = min(pending, limit)
        self._fences.read()  # used->idx before the elements it covers
        elems = self._used_elements(next_used, pending)
        size = self.size
        slot_token = self._slot_token
        slot_writable = self._slot_writable
        chains = self._chains
        it = iter(elems)
        # The count of entries reaped is len(done) - first, of chains (not
        # slots) ``chained``: no counter bumped per entry on the slots' path.
        first = len(done)
        append = done.append
        chained = 0
        for head, length in zip(it, it):
            token = slot_token[head] if head < size else None
            if token is not None:  # a slot: nothing to free
                if length > slot_writable[head]:
                    reaped = len(done) - first
                    self.next_used = at = (next_used + reaped) & 0xFFFF
                    self._slots_busy -= reaped - chained
                    self._fail("used entry %d for descriptor %d claims %d bytes written, "
                               "the chain has %d writable" % (at, head, length,
                                                              slot_writable[head]))
                slot_token[head] = None
            else:
                chain = chains.get(head)
                if chain is None or length > chain.writable:
                    reaped = len(done) - first
                    self.next_used = at = (next_used + reaped) & 0xFFFF
                    self._slots_busy -= reaped - chained
                    if head >= size:
                        self._fail("used entry %d names descriptor %d, the ring has %d"
                                   % (at, head, size))
                    if chain is None:
                        self._fail("used entry %d names descriptor %d, which is not the "
                                   "head of a chain in flight" % (at, head))
                    self._fail("used entry %d for descriptor %d claims %d bytes written, "
                               "the chain has %d writable" % (at, head, length,
                                                              chain.writable))
                del chains[head]
                self._retire(chain)
                self._free.extend(reversed(chain.descs))
                token = chain.token
                chained += 1
            append((token, length))
        reaped = len(done) - first
        self.next_used = (next_used + reaped) & 0xFFFF
        self._slots_busy -= reaped - chained
        # Used out of order (see _reap_in_order)? Only a queue reaped with
        # reap_run looks; the others just say "not known".
        if not self._tracks_order or elems[0:2 * reaped:2] != self._avail_heads(next_used,
                                                                                 reaped):
            self._order_mark = self.next_avail
        return True

    def _avail_heads(self, position, count):
        """The heads of ``count`` avail entries from ``position`` on, as a list."""
        size = self.size
        start = position & (size - 1)
        end = start + count
        if end <= size:
            return self._avail_words(start, count)
        return self._avail_words(start, size - start) + self._avail_words(0, end - size)

    if _RING_WORDS_VIA_STRUCT:
        def _avail_words(self, start, count):   # as _used_words, below
            unpack_from, avail = _RING_WORD_STRUCTS["H"].unpack_from, self._avail
            return [unpack_from(avail, at)[0] for at in range(4 + 2 * start,
                                                               4 + 2 * (start + count), 2)]
    else:
        def _avail_words(self, start, count):
            return self._avail[2 + start:2 + start + count].tolist()

    def _used_elements(self, next_used, count):
        """``count`` used elements from ``next_used`` on, as [id, len, id, len, ...]."""
        size = self.size
        start = next_used & (size - 1)
        end = start + count
        if end <= size:   # one bulk read, or two where the ring wraps
            return self._used_words(start, count)
        return self._used_words(start, size - start) + self._used_words(0, end - size)

    if _RING_WORDS_VIA_STRUCT:
        # PyPy: tolist() of a cast view is a loop outside the JIT (PyPy
        # 7.3.11); struct loads it compiles.
        def _used_words(self, start, count):
            unpack_from, used = _RING_WORD_STRUCTS["I"].unpack_from, self._used_bytes
            return [unpack_from(used, at)[0] for at in range(8 * start, 8 * (start + count), 4)]
    else:
        def _used_words(self, start, count):
            return self._used_elems[2 * start:2 * (start + count)].tolist()

    def _reap_whole_batch(self):
        """The fast path's usual reap, under the lock: ``_slot_batch``, reaped whole.

        When the device used exactly that batch (the slots posted at one
        time, all the queue has in flight), each head once in any order and
        each length the one all of them have: the batch, its slots idle (its
        ``tokens`` the queue's tokens, in slot order). Else None with nothing
        changed.
        """
        batch = self._slot_batch
        used_idx = self._load_used(1)
        next_used = self.next_used
        pending = (used_idx - next_used) & 0xFFFF
        if batch is None or pending != batch.count or pending != self._slots_busy:
            return None
        self._fences.read()  # used->idx before the elements it covers
        start = next_used & (self.size - 1)
        end = start + pending
        # The usual case is one comparison of the entries' bytes (covered by
        # used->idx, so no longer written) with the ones the device wrote for
        # this batch last time: the same heads in the same order (qemu-storage-
        # daemon keeps one) and each the batch's length. Else, element by element.
        if end > self.size or self._used_bytes[8 * start:8 * end].tobytes() != batch.used:
            elems = self._used_elements(next_used, pending)
            heads = elems[0::2]
            heads.sort()
            if heads != batch.heads or elems[1::2].count(batch.writable) != pending:
                return None
            batch.used = _used_entries(elems)
        if batch.heads_slice is not None:
            self._slot_token[batch.heads_slice] = batch.nones
        else:
            for head in batch.heads:
                self._slot_token[head] = None
        self._slot_batch = None
        self.next_used = used_idx
        self._slots_busy = 0
        self._order_mark = self.next_avail
        return batch

    def _reap_full_slots(self):
        """Reap used slots that each report exactly their writable bytes; their tokens.

        Under the lock. The fast path's slots, in one lean loop, in the order
        the device used them (a whole batch is ``_reap_whole_batch``'s): None
        (nothing reaped, nothing changed) when any used entry is something
        else (a chain, a shorter length, a lie), which ``_reap`` then walks
        and reports.
        """
        self._slot_batch = None   # entry by entry from now on
        used_idx = self._load_used(1)
        next_used = self.next_used
        pending = (used_idx - next_used) & 0xFFFF
        if not pending:
            return []
        if pending > self._slots_busy:
            return None
        self._fences.read()  # used->idx before the elements it covers
        elems = self._used_elements(next_used, pending)
        slot_token, slot_writable = self._slot_token, self._slot_writable
        tokens = []
        append = tokens.append
        it = iter(elems)
        try:
            for head, length in zip(it, it):
                token = slot_token[head]   # IndexError past the ring
                if token is None or length != slot_writable[head]:
                    raise IndexError(head)
                slot_token[head] = None
                append(token)
        except IndexError:
            for head, token in zip(elems[0::2], tokens):   # put back the ones taken
                slot_token[head] = token
            return None
        self.next_used = used_idx
        self._slots_busy -= pending
        self._order_mark = self.next_avail
        return tokens

    def _retire(self, chain):
        """Copy a used chain's device-written bounce buffers back and free its block."""
        for gpa, target in chain.copy_out:
            target[:] = self.mem.view(gpa, len(target))
        if chain.block is not None:
            self._release(chain.block, chain.block_size)

    def has_used(self) -> bool:
        """Whether the device used entries not reaped yet: a peek, without the lock."""
        return self._load_used(1) != self.next_used

    def wait_used(self, timeout: Optional[float] = 5.0, count: int = 1,
                  spin: Optional[float] = None) -> _Used:
        """Wait until the device has used chains, then reap them as ``get_used``.

        Spins on used->idx for ``spin`` seconds (default ``self.spin``), then
        sleeps on the call eventfd. Calls without new used entries are
        normal (libvhost-user signals once when SET_VRING_CALL arrives) and
        are simply waited through. With RING_EVENT_IDX, used_event asks for
        one interrupt once ``count`` more entries are used; after re-arming,
        used->idx is read again so a completion that raced the re-arm is not
        slept through (spec 2.7.10).

        Args:
            timeout: seconds to wait in all.
            count: entries worth waking up for (clamped to those in flight);
                fewer may be returned if the device is slow to use them.

        Returns:
            The reaped entries; an empty list when ``timeout`` passed first.
        """
        deadline = time.monotonic() + timeout
        while True:
            ready = self.wait_for_used(deadline - time.monotonic(), count, spin)
            # At the timeout too: what was used meanwhile is returned, not
            # dropped, and a broken ring still raises.
            done = self.get_used()
            if done or not ready:
                return done

    def wait_for_used(self, timeout: Optional[float], count: int = 1,
                      spin: Optional[float] = None) -> bool:
        """Wait until the device has used entries, without reaping them; whether it has.

        The spin/sleep policy of every wait (``wait_used``, the devices'
        fast paths): poll used->idx for ``spin`` seconds (default
        ``self.spin``); with no spin and ``defer_calls`` (the policy for a
        CPU shared with the back-end) yield the CPU once; then ask for a
        call once ``count`` more entries are used and sleep on the call
        eventfd. False at the timeout, or when
        ``wake_waiter`` was called and nothing is used.

        With ``spin_max``, the spin adapts as the kernel's halt-polling does:
        a sleep shorter than ``spin_max`` doubles ``spin`` (polling longer
        would have caught it, without two cross-CPU wake-ups), a longer one
        halves it (the back-end is slow: polling only burns the CPU).
        """
        if not _TRACING_JIT and self.has_used():
            return True   # already there: no clock read (not under PyPy: see _SPIN_RUN)
        now = time.monotonic()
        deadline = now + timeout
        spin = self.spin if spin is None else spin
        has_used = self.has_used
        yielded = not self.defer_calls or spin > 0
        try:
            if spin > 0 and self.spin_for_used(min(spin, timeout)):
                return True
            while True:
                if has_used():
                    return True
                now = time.monotonic()
                if now >= deadline:
                    return False
                if not yielded:
                    # Not polling (a CPU shared with the back-end): let it
                    # run what was kicked before asking for a call and
                    # sleeping, which wakes us after its first entry.
                    yielded = True
                    os.sched_yield()
                    continue
                if self._arm(count) is False:
                    continue
                self.call.wait(deadline - now)
                if self.spin_max:
                    self._adapt_spin(time.monotonic() - now)
                if self._woken:
                    self._woken = False
                    return has_used()
        except ValueError:
            # close() on another thread released the ring views and closed
            # the call event under us: say that, not "Event is closed".
            self._check_usable()
            raise

    def _adapt_spin(self, slept):
        spin_max = self.spin_max
        if slept < spin_max:
            self.spin = min(spin_max, max(2 * self.spin, _DEFAULT_SPIN))
        else:
            spin = self.spin / 2
            self.spin = spin if spin >= _DEFAULT_SPIN / 8 else 0.0

    def wake_waiter(self) -> None:
        """Make a thread sleeping in ``wait_used`` return now, with what is used so far.

        For the owner of the queue that must tell its waiters something (the
        back-end crashed, the device is closing) sooner than their timeout.
        """
        self._woken = True
        self.call.signal()

    def _arm(self, count):
        """Ask for an interrupt; False if entries were used meanwhile (re-check)."""
        with self.lock:
            self._check_usable()
            if not self._event_idx:
                return None
            want = max(1, min(count, self.in_flight))
            self._request_interrupt(want - 1)
            self._fences.full()  # used_event visible before we look at used->idx again
            return not self.has_used()

    # -- the batch seam: what a device's fast path calls, holding ``lock`` --------
    #
    # A device keeps a table of slots (chains built once, ``add_slot``) and
    # posts runs of them; a ``_SlotBatch`` names a run of slots posted at one
    # time, which is reaped whole by one comparison when the device used
    # exactly it. Everything else is reaped entry by entry, every entry
    # checked as ``get_used`` checks it. The caller holds ``lock`` (a device
    # passes a re-entrant one, shared with its completion routing).

    def check_usable(self) -> None:
        """Raise what a call on this queue would: broken (ProtocolError) or closed (ValueError)."""
        if self._broken is not None or self._block is None:
            self._check_usable()

    @property
    def kick_pending(self) -> bool:
        """True when chains were posted since the last notify decision (notify=False)."""
        return self.next_avail != self._kicked

    def post_run(self, slots: Sequence[int], tokens: Sequence[Any]) -> None:
        """``post_slots`` without its checks: slots the caller knows are idle, built here."""
        self._post_slots(slots, tokens)

    def post_batch(self, batch: _SlotBatch, notify: bool) -> bool:
        """Post a ``_SlotBatch`` whose slots are all idle; True when the device wants a kick.

        ``notify`` False leaves the kick decision to a later ``notify()``.
        """
        return self._post_slot_batch(batch, notify)

    def kick_due(self) -> bool:
        """``notify()``'s decision without the kick: True when the device wants one."""
        return self._kick_due()

    def repoint_slot(self, slot: int, position: int, guest_addr: int, length: int,
                     writable: bool) -> None:
        """``set_slot_buffer`` without its checks: a guest range the caller checked."""
        self._set_slot_buffer(slot, position, guest_addr, length, writable)

    def set_slot_lengths(self, slots: Sequence[int], lengths: Sequence[int]) -> None:
        """New lengths for one-descriptor, driver-readable idle slots (a frame per post)."""
        for slot, length in zip(slots, lengths):
            self._set_slot_length(slot, length)

    def _set_slot_length(self, slot, length):
        _DESC_LEN.pack_into(self._desc, 16 * slot + 8, length)

    def reap_batch(self) -> Tuple[Optional[_SlotBatch], _Used]:
        """Reap the batch vouched for at post when the device used exactly it.

        Returns ``(batch, used)``: the ``_SlotBatch`` (its slots idle again)
        or None with nothing changed; ``used``, what else was used meanwhile
        (``get_used``'s entries) when reaping re-arms the call.
        """
        if self._broken is not None or self._block is None:
            self._check_usable()
        batch = self._reap_whole_batch()
        if batch is None:
            return None, ()
        if self._event_idx and not self.defer_calls:
            return batch, self._reap_after_lean()
        return batch, ()

    def reap_full(self) -> Tuple[List[Any], _Used]:
        """Reap used slots that each report exactly their writable bytes, in one loop.

        Returns ``(tokens, used)``: their tokens in the order used, and the
        other entries (chains, a shorter length, anything to report) reaped
        and checked as ``get_used`` does.
        """
        self.check_usable()
        tokens = self._reap_full_slots()
        if tokens is None:
            return [], self._reap(None)
        return tokens, (self._reap_after_lean() if tokens else ())

    def _reap_after_lean(self):
        # As _reap after a reap: re-arm for the next entry and look again
        # (not when calls are asked for only before sleeping).
        if self._event_idx and not self.defer_calls:
            self._rearm()
            return self._reap(None)
        return ()

    def reap_run(self, limit: Optional[int] = None) -> Tuple[List[Any], List[int]]:
        """Reap what the device used, slots and chains alike: ``(tokens, lengths)``.

        The receive path's reap: on a split ring whose device uses buffers in
        the order they were made available (DPDK does), a run is checked in
        bulk; anything else entry by entry. Every entry is checked as
        ``get_used`` checks it, and ProtocolError leaves the queue broken.
        """
        self.check_usable()
        done = self._reap_in_order(limit)
        if done is None:
            used = self._reap(limit)
            return [token for token, _ in used], [length for _, length in used]
        return done

    def _reap_in_order(self, limit):
        """``reap_run``'s bulk check, or None with nothing changed.

        A device that uses buffers in the order they were made available
        writes, at each used position, the head at the same avail position.
        Every avail entry from next_used to next_avail names a distinct slot
        in flight, unless an entry was used out of order since they were
        posted (``_order_mark``): so used heads equal to the avail heads are
        slots in flight, each once, and one list comparison checks them all.
        """
        self._tracks_order = True
        used_idx = self._load_used(1)
        next_used = self.next_used
        pending = (used_idx - next_used) & 0xFFFF
        if not pending:
            return [], []
        mark = self._order_mark
        if mark is not None:
            if (self.next_avail - next_used) & 0xFFFF > (self.next_avail - mark) & 0xFFFF:
                return None
            self._order_mark = None   # everything posted before the mark is reaped
        if limit is not None and pending > limit:
            pending = limit
        writable = self._writable_all
        if pending > self._slots_busy or self._chains or writable is None:
            return None
        self._fences.read()  # used->idx before the elements it covers
        elems = self._used_elements(next_used, pending)
        heads = elems[0::2]
        if heads != self._avail_heads(next_used, pending):
            return None
        lengths = elems[1::2]
        if _largest(lengths) > writable:
            return None
        slot_token = self._slot_token
        low = heads[0]
        if heads == self._slot_range[low:low + pending]:   # a run of heads: one step each
            tokens = slot_token[low:low + pending]
            # "None in" compares every int with None, slowly; tokens equal to
            # their heads (NetDevice's receive buffers) are no None, and one
            # list compare says so. None cannot be (see above): the careful
            # path would say why.
            if tokens != heads and None in tokens:
                return None
            slot_token[low:low + pending] = [None] * pending
        else:
            tokens = list(map(slot_token.__getitem__, heads))
            if None in tokens:
                return None
            for head in heads:
                slot_token[head] = None
        self.next_used = (next_used + pending) & 0xFFFF
        self._slots_busy -= pending
        return tokens, lengths

    @property
    def broken(self) -> Optional[ProtocolError]:
        """The ProtocolError that broke the queue, or None."""
        return self._broken

    def fail(self, message: str) -> None:
        """Break the queue for what a device found wrong in a used buffer: ProtocolError.

        Every later call on the queue raises it again, as after a bad used entry.
        """
        self._fail(message)

    def spin_for_used(self, seconds: float) -> bool:
        """Poll for used entries up to ``seconds``; True when there are some."""
        # Looks in runs of a fixed count, with no exit inside a run: see
        # _SPIN_RUN. The look is spelled out (through has_used PyPy runs
        # the loop markedly slower).
        load_used, next_used = self._load_used, self.next_used
        until = time.monotonic() + seconds
        while True:
            moved = 0
            for _ in _SPIN_RUN:
                moved |= load_used(1) ^ next_used
            if moved:
                return True
            if time.monotonic() >= until:
                return False

    def _check_usable(self):
        if self._broken is not None:
            raise ProtocolError("queue %d is unusable since an earlier error: %s"
                                % (self.index, self._broken))
        if self._block is None:
            raise ValueError("queue %d is closed" % self.index)

    def _fail(self, message):
        self._broken = ProtocolError("queue %d: %s" % (self.index, message))
        raise self._broken

    def close(self) -> None:
        """Close the events and free the ring and in-flight buffers; safe to call twice.

        Chains still in flight are abandoned: stop the device first.
        """
        for event in (self.kick, self.call):
            if event is not None:
                event.close()
        for view in self._views:
            view.release()
        self._views = ()
        if self._block is not None and self.mem._regions is not None:
            for chain in getattr(self, "_chains", {}).values():
                if chain.block is not None:
                    self.mem.free(chain.block)
            for blocks in getattr(self, "_spare", {}).values():
                for block in blocks:
                    self.mem.free(block)
            self.mem.free(self._block)
        self._chains = {}
        self._spare = {}
        self._slot_descs = {}
        self._slots_busy = 0
        self._slot_batch = None
        self._block = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "<Queue %d size=%d desc=%#x avail=%#x used=%#x next_avail=%d>" % (
            self.index, self.size, self.desc_table, self.avail_ring, self.used_ring,
            self.next_avail)


# Tracebacks and repr() name the error as callers catch it, Queue.Full, not by its private
# name; pickle finds it under that name too.
_QueueFull.__name__, _QueueFull.__qualname__ = "Full", "Queue.Full"


############################################################################
# Packed queue #############################################################
############################################################################

# Packed layout (virtio spec 2.8, RING_PACKED): one ring of 16-byte
# descriptors (addr, len, buffer id, flags), then the driver's and the
# device's event suppression areas (off_wrap u16, flags u16), 4-aligned.
# ``Queue(..., features=RING_PACKED)`` builds a ``_PackedQueue``: the same
# API and the same memory-ordering rules as the split ring, plus these:
# - Packed rings (spec 2.8) have no indices: a descriptor's flags say whose
#   it is. So the head's flags are stored on their own, through the
#   accessor: the driver writes a chain's (or a batch's) other descriptors
#   and the head's addr/len/id first and the first head's flags last, after
#   the write fence (spec 2.8.21); it reads a used descriptor's flags first
#   and its id and length after the read fence. Reaping loads the flags
#   through the cast view, also on PyPy where such a load may tear: the
#   device flips only USED (bit 15) of a descriptor made available, AVAIL
#   (bit 7) is in the other byte, so a torn value is the old state or the
#   new one. The store->load cases are the same two: publishing a head and
#   then reading the device event suppression area, and writing the driver
#   area and then re-reading the next used flags.

#: Packed descriptor flags (virtio spec 2.8.1): the driver's and the device's
#: wrap counters; NEXT, WRITE and INDIRECT keep their split-ring values.
_PACKED_F_AVAIL = 1 << 7
_PACKED_F_USED = 1 << 15
_PACKED_F_BOTH = _PACKED_F_AVAIL | _PACKED_F_USED
#: Event suppression flags (spec 2.8.10): interrupts or kicks on, off, or at
#: one descriptor position (only with RING_EVENT_IDX).
_EVENT_F_ENABLE = 0
_EVENT_F_DISABLE = 1
_EVENT_F_DESC = 2
#: A packed descriptor is addr u64, len u32, buffer id u16, flags u16; the
#: head's first 14 bytes go first and its flags last (spec 2.8.21).
_PACKED_HEAD = struct.Struct("<QIH")
# Whether _PackedQueue posts a batch of slots as one copy of their cached
# descriptor images and reaps a run of used ones with strided bulk reads. On
# CPython that is fewer bytecodes per descriptor; PyPy's JIT compiles the
# per-descriptor loops into less than the bulk copies cost it (bench --type
# net --packed: more frontend CPU per packet with them), so not there.
_PACKED_BULK = sys.implementation.name != "pypy"
#: SET_VRING_BASE of a fresh packed ring: both wrap counters start at 1 (spec 2.8.1).
_PACKED_INITIAL_BASE = 1 << 15 | 1 << 31


class _PackedQueue(Queue):
    """The packed layout (virtio spec 2.8) behind ``Queue``'s API.

    ``Queue(..., features=...)`` with RING_PACKED builds one. The ring is
    16-byte descriptors (addr, len, buffer id, flags) that the driver fills
    in order and the device overwrites in order with used ones; the driver
    event suppression area (written here: when to interrupt us) and the
    device's (read here: when to kick) follow. ``desc_table``, ``avail_ring``
    and ``used_ring`` are the descriptor ring, the driver area and the device
    area, which is what SET_VRING_ADDR's desc, avail and used carry for a
    packed ring. ``next_avail``/``next_used`` are ring positions, with the
    wrap counters in ``avail_wrap``/``used_wrap``; ``vring_base`` is the
    32-bit packed encoding.

    Each chain takes one buffer id (the free id stack is Queue's free list)
    and as many ring positions as descriptors (one when indirect); the
    device hands back the id in the used descriptor and skips that many
    positions, so ``num_free`` counts positions. A slot (``add_slot``) is a
    buffer id whose chain is kept and written into the ring at each post;
    it holds its positions while idle, as a split slot holds descriptors.
    """

    packed = True

    def __init__(self, mem, size, index=0, vector=None, features=0, lock=None):
        Queue.__init__(self, mem, size, index, vector, features, lock)
        self.avail_wrap = self.used_wrap = 1
        self.vring_base = _PACKED_INITIAL_BASE
        self._free_slots = size
        self._added = 0          # positions published since the last notify decision
        self._slot_chain = {}    # slot (its buffer id) -> [[gpa, length, flags], ...]
        self._slot_size = [0] * size   # slot -> its descriptor count
        # slot -> its chain's descriptors as written in a lap whose wrap counter
        # is 0 and as written in one where it is 1, flags included, made by
        # add_slot; None once set_slot_buffer changed the chain. _publish
        # copies them into the ring.
        self._slot_image = [None] * size
        self._posted = [0] * size      # buffer id -> when it was last posted (for rewind)
        self._post_count = 0

    @staticmethod
    def _ring_bytes(size):
        return 16 * size + 4 + 4

    def _map_rings(self, mem, size):
        self.desc_table = self._block
        self.avail_ring = self.desc_table + 16 * size   # driver event suppression
        self.used_ring = self.avail_ring + 4            # device event suppression
        self._desc = mem.view(self.desc_table, 16 * size)
        # Descriptor words: [8 i + 6] buffer id, [8 i + 7] flags, the one word
        # both sides race on (through the accessor); u32 [4 i + 2] len.
        self._load_word, self._store_word, words = _ring_words(self._desc, "H")
        self._desc_h = self._desc.cast("H")
        self._desc_i = self._desc.cast("I")
        # Event areas: [0] off_wrap (bits 0-14 position, bit 15 wrap), [1] flags.
        driver = mem.view(self.avail_ring, 4)
        device = mem.view(self.used_ring, 4)
        _, self._store_driver_event, driver_words = _ring_words(driver, "H")
        self._load_device_event, _, device_words = _ring_words(device, "H")
        self._views = (words, self._desc_h, self._desc_i, driver_words, device_words,
                       driver, device, self._desc)

    @property
    def num_free(self):
        """Free descriptor positions in the ring (idle slots hold theirs)."""
        return self._free_slots

    def used_index(self):
        """None: a packed ring has no used index in memory (see ``next_used``)."""
        return None

    def _positions_in_flight(self):
        busy = self._slot_token
        return (sum(len(chain.descs) for chain in self._chains.values())
                + sum(len(items) for slot, items in self._slot_chain.items()
                      if busy[slot] is not None))

    def reclaim(self, base):
        """Take the queue back after the back-end stopped it (see ``Queue.reclaim``).

        ``base`` is GET_VRING_BASE's 32-bit packed answer. An idle queue is
        re-based onto the back-end's positions and wrap counters, and the ring's
        stale flags are rewritten to match them, so no old descriptor looks
        available to the device or used to the driver.

        Raises:
            ProtocolError: a position past the ring, a used position that is
                not the avail one on an idle ring, or an avail position ahead
                of what was posted or behind what is in flight.
        """
        state = _decode_packed_base(base, self.size)
        request = FrontendReq.GET_VRING_BASE
        with self.lock:
            if self.in_flight:
                # Positions the back-end has not taken: from its avail position to ours.
                untaken = self.next_avail - state.avail
                if state.avail_wrap != self.avail_wrap:
                    untaken += self.size
                in_flight = self._positions_in_flight()
                if not 0 <= untaken <= in_flight:
                    raise ProtocolError(
                        "GET_VRING_BASE: packed base %#x (avail %d, wrap %d) of queue %d, but "
                        "the driver is at %d, wrap %d, with %d descriptor(s) in flight"
                        % (base, state.avail, state.avail_wrap, self.index, self.next_avail,
                           self.avail_wrap, in_flight), request)
            else:
                if (state.used, state.used_wrap) != (state.avail, state.avail_wrap):
                    raise ProtocolError(
                        "GET_VRING_BASE: packed base %#x of idle queue %d has used position "
                        "%d, wrap %d, but avail %d, wrap %d" % (
                            base, self.index, state.used, state.used_wrap, state.avail,
                            state.avail_wrap), request)
                self._restamp(state.avail, state.avail_wrap)
                self.next_avail = self.next_used = state.avail
                self.avail_wrap = self.used_wrap = state.avail_wrap
            self._added = 0
            self.vring_base = _encode_packed_base(state)

    def _restamp(self, position, wrap):
        """Flags of an idle ring at ``position``: used this lap before it, the last lap after."""
        store = self._store_word
        this_lap = _PACKED_F_BOTH if wrap else 0
        for slot in range(self.size):
            store(8 * slot + 7, this_lap if slot < position else this_lap ^ _PACKED_F_BOTH)

    def rewind(self):
        """Offer every chain in flight again, oldest first; returns the new ``vring_base``.

        The packed ring's ``Queue.rewind``, for a back-end that restarted and
        lost its ring state. Used descriptors the old back-end wrote stay to
        be reaped; from the position after them on, the ring is rewritten
        with the chains still in flight in the order they were posted (a
        completion out of order may have overwritten where one was), so a
        back-end started there (SET_VRING_BASE: that position and wrap
        counter, for avail and used alike) takes each exactly once. The
        descriptors come from the driver's own record, never from the ring.

        Raises:
            ProtocolError: a used descriptor names a chain that is not in
                flight, or the chains left do not fill the ring up to the
                driver's position (the queue is broken).
        """
        with self.lock:
            self._check_usable()
            size, chains, busy = self.size, self._chains, self._slot_token
            position, wrap = self.next_used, self.used_wrap
            done = set()
            while len(done) < self.in_flight:
                if self._load_word(8 * position + 7) & _PACKED_F_BOTH != (
                        _PACKED_F_BOTH if wrap else 0):
                    break
                self._fences.read()
                buffer_id = self._desc_h[8 * position + 6]
                if buffer_id >= size or buffer_id in done or (
                        buffer_id not in chains and busy[buffer_id] is None):
                    self._fail("rewind: used descriptor %d names buffer id %d, which is not "
                               "in flight" % (position, buffer_id))
                done.add(buffer_id)
                position += (len(chains[buffer_id].descs) if buffer_id in chains
                             else self._slot_size[buffer_id])
                if position >= size:
                    position, wrap = position - size, wrap ^ 1
            waiting = [i for i in chains if i not in done]
            waiting += [i for i, token in enumerate(busy) if token is not None and i not in done]
            waiting.sort(key=self._posted.__getitem__)
            items = [chains[i].descs if i in chains else self._slot_chain[i] for i in waiting]
            room = self.next_avail - position + (size if wrap != self.avail_wrap else 0)
            if sum(map(len, items)) != room:
                self._fail("rewind: %d chain(s) of %d descriptor(s) are waiting, but the "
                           "used descriptors end %d position(s) before the driver's"
                           % (len(waiting), sum(map(len, items)), room))
            self.next_avail, self.avail_wrap = position, wrap
            first = None
            for buffer_id, resolved in zip(waiting, items):
                head, flags = self._write_ring(buffer_id, resolved)
                if first is None:
                    first = (head, flags)
                else:
                    self._store_word(8 * head + 7, flags)  # hidden behind the first head
            if first is not None:
                self._fences.write()
                self._store_word(8 * first[0] + 7, first[1])
            self._added = 0   # the new back-end is kicked once when its ring starts
            self.vring_base = _encode_packed_base(_PackedBase(position, wrap, position, wrap))
            self.rewinds += 1
            return self.vring_base

    # -- driver side: posting ---------------------------------------------------

    @staticmethod
    def _fill_table(table, resolved):
        """An indirect table of packed descriptors: in order, only WRITE (spec 2.8.19)."""
        for i, (gpa, length, flags) in enumerate(resolved):
            _DESC.pack_into(table, 16 * i, gpa, length, 0, flags)

    def _write_ring(self, buffer_id, resolved):
        """Write a chain from next_avail on, all but its head's flags: (head, its flags)."""
        ring, size = self._desc, self.size
        position, wrap = self.next_avail, self.avail_wrap
        head = position
        head_flags = None
        last = len(resolved) - 1
        for i, (gpa, length, flags) in enumerate(resolved):
            # An available descriptor has AVAIL = the wrap counter, USED = its inverse.
            flags |= (_PACKED_F_AVAIL if wrap else _PACKED_F_USED) | (
                _DESC_F_NEXT if i < last else 0)
            if i:
                _DESC.pack_into(ring, 16 * position, gpa, length, buffer_id, flags)
            else:
                _PACKED_HEAD.pack_into(ring, 16 * position, gpa, length, buffer_id)
                head_flags = flags
            position += 1
            if position == size:
                position, wrap = 0, wrap ^ 1
        self.next_avail, self.avail_wrap = position, wrap
        self._added += len(resolved)
        return head, head_flags

    def _post(self, resolved, indirect, block, table_bytes, chain):
        """Write the chain, then the head's flags: that publishes it."""
        if indirect:
            resolved = ((block, table_bytes, _DESC_F_INDIRECT),)
        buffer_id = self._free.pop()
        self._posted[buffer_id] = self._post_count
        self._post_count += 1
        chain.descs = tuple(resolved)   # their count is what the device skips when it uses it
        self._chains[buffer_id] = chain
        self._free_slots -= len(resolved)
        head, head_flags = self._write_ring(buffer_id, resolved)
        self._fences.write()  # the chain before the head's flags (spec 2.8.21)
        self._store_word(8 * head + 7, head_flags)

    # Slots: add_slot takes a buffer id (_take_descs) and keeps the chain
    # (_write_chain); posting writes it into the ring (_publish).

    def _take_descs(self, count):
        self._free_slots -= count
        return [self._free.pop()] * count

    def _write_chain(self, descs, resolved):
        self._slot_chain[descs[0]] = [list(item) for item in resolved]
        self._slot_size[descs[0]] = len(resolved)
        self._make_slot_image(descs[0])

    def _set_slot_buffer(self, slot, position, guest_addr, length, writable):
        descs, lengths = self._slot_descs[slot]
        item = self._slot_chain[slot][position]
        flags = _DESC_F_WRITE if writable else 0
        lengths[position] = length if writable else 0
        self._slot_writable[slot] = sum(lengths)
        self._note_writable(self._slot_writable[slot])
        image = self._slot_image[slot]
        if _PACKED_BULK and image is not None and item[0] == guest_addr and item[2] == flags:
            # Only the length changed (a transmit slot's frame, every post): patch it
            # into both cached images, so the batch is still one copy in _publish.
            item[1] = length
            offset = 16 * position + 8
            _DESC_LEN.pack_into(image[0], offset, length)
            _DESC_LEN.pack_into(image[1], offset, length)
        else:
            item[:] = guest_addr, length, flags
            self._slot_image[slot] = None

    def _make_slot_image(self, slot):
        """Cache the slot's chain as available descriptors, for either wrap counter.

        Mutable, so ``_set_slot_buffer`` can patch a length in place.
        """
        items = self._slot_chain[slot]
        last = len(items) - 1
        # An available descriptor has AVAIL = the wrap counter, USED = its inverse.
        self._slot_image[slot] = tuple(
            bytearray(b"".join([_DESC.pack(gpa, length, slot,
                                           flags | avail_bits | (_DESC_F_NEXT if i < last else 0))
                                for i, (gpa, length, flags) in enumerate(items)]))
            for avail_bits in (_PACKED_F_USED, _PACKED_F_AVAIL))

    def remove_slot(self, slot):
        """Give an idle slot's positions and buffer id back for ``add``."""
        with self.lock:
            self._check_usable()
            self._check_slot(slot, "remove_slot")
            del self._slot_descs[slot]
            self._free_slots += len(self._slot_chain.pop(slot))
            self._free.append(slot)

    def _publish(self, heads):
        """Write the slots' chains into the ring, the first head's flags last.

        One batch (spec 2.8.21, "Making multiple buffers available"): every
        other descriptor, later heads included, is written available at
        once; the device reads none of them before the first head's flags,
        stored after the write fence.
        """
        if not heads:
            return
        ring, size, chain_of = self._desc, self.size, self._slot_chain
        start = position = self.next_avail
        wrap = self.avail_wrap
        # The usual batch, within this lap: the slots' cached descriptor images
        # in one copy, all but the first head's flags; then those, last.
        images = self._slot_image
        end = size + 1
        if _PACKED_BULK and images[heads[0]] is not None:
            data = [images[slot] for slot in heads]
            if None not in data:
                data = b"".join([image[wrap] for image in data])
                end = start + (len(data) >> 4)
        if end <= size:
            serial = self._post_count
            self._post_count += len(heads)
            posted = self._posted
            for slot in heads:
                posted[slot] = serial
                serial += 1
            ring[16 * start + 16:16 * end] = data[16:]
            ring[16 * start:16 * start + 14] = data[:14]
            self._added += end - start
            if end == size:
                end, wrap = 0, wrap ^ 1
            self.next_avail, self.avail_wrap = end, wrap
            self._fences.write()
            self._store_word(8 * start + 7, data[14] | data[15] << 8)
            return
        # A slot repointed since add_slot (a transmit buffer: every post), or
        # a batch crossing the end of the ring: descriptor by descriptor.
        pack_into = _DESC.pack_into
        # An available descriptor has AVAIL = the wrap counter, USED = its inverse.
        avail_bits = _PACKED_F_AVAIL if wrap else _PACKED_F_USED
        first_flags = None
        written = 0
        posted, serial = self._posted, self._post_count
        self._post_count += len(heads)
        for slot in heads:
            posted[slot] = serial
            serial += 1
            items = chain_of[slot]
            if len(items) == 1:   # the common case (a receive buffer, a frame), spelled out
                gpa, length, flags = items[0]
                if first_flags is None:
                    _PACKED_HEAD.pack_into(ring, 16 * position, gpa, length, slot)
                    first_flags = flags | avail_bits
                else:
                    pack_into(ring, 16 * position, gpa, length, slot, flags | avail_bits)
                position += 1
                if position == size:
                    position = 0
                    wrap ^= 1
                    avail_bits ^= _PACKED_F_BOTH
                continue
            last = len(items) - 1
            for i, (gpa, length, flags) in enumerate(items):
                flags |= avail_bits | (_DESC_F_NEXT if i < last else 0)
                if first_flags is None:
                    _PACKED_HEAD.pack_into(ring, 16 * position, gpa, length, slot)
                    first_flags = flags
                else:
                    pack_into(ring, 16 * position, gpa, length, slot, flags)
                position += 1
                if position == size:
                    position = 0
                    wrap ^= 1
                    avail_bits ^= _PACKED_F_BOTH
            written += last
        self._added += written + len(heads)
        self.next_avail, self.avail_wrap = position, wrap
        self._fences.write()
        self._store_word(8 * start + 7, first_flags)

    def _kick_due(self, force=False):
        # Queue.notify's test for a packed ring: the device event suppression
        # area (spec 2.8.10), DISABLE, or with RING_EVENT_IDX a descriptor
        # position and wrap counter.
        added, self._added = self._added, 0
        if not added and not force:
            return False
        self._fences.full()  # the head flags visible before we read the device's wish
        flags = self._load_device_event(1)
        if force:
            return True
        if flags == _EVENT_F_DESC and self._event_idx and added < self.size:
            off_wrap = self._load_device_event(0)
            event = off_wrap & 0x7FFF
            if off_wrap >> 15 != self.avail_wrap:
                event -= self.size  # a position in the previous lap
            new = self.next_avail
            return _need_event(event & 0xFFFF, new, (new - added) & 0xFFFF)
        return flags != _EVENT_F_DISABLE

    # -- driver side: reaping ----------------------------------------------------

    def has_used(self) -> bool:
        # The position at next_used is one we posted while chains are in
        # flight; anything but its "available" flags means the device wrote it.
        return bool(self.in_flight) and (
            self._load_word(8 * self.next_used + 7) & _PACKED_F_BOTH
            != (_PACKED_F_AVAIL if self.used_wrap else _PACKED_F_USED))

    def spin_for_used(self, seconds: float) -> bool:
        """Poll for used descriptors up to ``seconds``; True when there are some."""
        has_used = self.has_used
        until = time.monotonic() + seconds
        while True:
            moved = False
            for _ in _SPIN_RUN:   # as the split layout's spin_for_used
                moved |= has_used()
            if moved:
                return True
            if time.monotonic() >= until:
                return False

    def _reap_whole_batch(self):
        """None: the packed layout's used descriptors are walked by ``_reap_some``."""
        return None

    def _reap_in_order(self, limit):
        """None: ``_reap_some`` walks a packed ring's used descriptors in bulk itself."""
        return None

    @property
    def kick_pending(self):
        return self._added != 0

    def _set_slot_length(self, slot, length):
        # The chain's record and both cached images (so a batch is still one
        # copy in _publish): a transmit slot's frame changes only its length.
        item = self._slot_chain[slot][0]
        item[1] = length
        image = self._slot_image[slot]
        if image is not None:
            _DESC_LEN.pack_into(image[0], 8, length)
            _DESC_LEN.pack_into(image[1], 8, length)

    _reap_full_slots = _reap_whole_batch   # the same: None

    def _reap_some(self, limit, done):
        # A used descriptor's flags are read first, then (after the read fence)
        # its id and length. The flags are read through the cast view, not the
        # accessor, which lets PyPy compile the loop: the device changes only
        # USED (bit 15) of a descriptor we made available, and AVAIL (bit 7) is
        # in the other byte, so even a torn load is the old or the new state,
        # never a third; the id and length are not changing once flags say used.
        position, wrap, words = self.next_used, self.used_wrap, self._desc_h
        if words[8 * position + 7] & _PACKED_F_BOTH == (
                _PACKED_F_AVAIL if wrap else _PACKED_F_USED):
            return False   # still available (the usual look after a reap): nothing used
        chains, slot_token, slot_writable = self._chains, self._slot_token, self._slot_writable
        slot_size, lengths = self._slot_size, self._desc_i
        read_fence = self._fences.read
        fenced = read_fence is not _no_fence   # a call saved per entry on x86
        size = self.size
        used_flags = _PACKED_F_BOTH if wrap else 0
        avail_flags = _PACKED_F_AVAIL if wrap else _PACKED_F_USED
        left = len(chains) + self._slots_busy
        if limit is not None:
            left = min(left, limit)
        reaped = slots_done = 0
        try:
            if _PACKED_BULK and left >= 8 and position + 8 <= size \
                    and words[8 * position + 63] & _PACKED_F_BOTH == used_flags:
                # A run of one-descriptor slots (the net device's buffers) is
                # at consecutive positions: their flags in one strided read,
                # then ids and lengths in two; the walk below goes on from the
                # first entry that is anything else. Only when the position 7
                # on looks used already: for fewer the walk is cheaper.
                count = min(left, size - position, 64)
                first = 8 * position + 7
                run = 0
                for flags in words[first:first + 8 * count:8].tolist():
                    if flags & _PACKED_F_BOTH != used_flags:
                        break
                    run += 1
                if fenced:
                    read_fence()
                ids = words[first - 1:first - 1 + 8 * run:8].tolist()
                first = 4 * position + 2
                for buffer_id, length in zip(ids, lengths[first:first + 4 * run:4].tolist()):
                    token = slot_token[buffer_id] if buffer_id < size else None
                    if token is None or slot_size[buffer_id] != 1:
                        break
                    if length > slot_writable[buffer_id]:
                        if slot_writable[buffer_id]:
                            break
                        length = 0   # a transmit buffer: DPDK's quirk, as below
                    slot_token[buffer_id] = None
                    done.append((token, length))
                    reaped += 1
                slots_done = reaped
                position += reaped
                if position == size:
                    position = 0
                    wrap ^= 1
                    used_flags ^= _PACKED_F_BOTH
                    avail_flags ^= _PACKED_F_BOTH
            while reaped < left:
                flags = words[8 * position + 7] & _PACKED_F_BOTH
                if flags != used_flags:
                    if flags == avail_flags:
                        break  # still available: not used yet
                    self.next_used, self.used_wrap = position, wrap
                    self._fail("descriptor %d has flags AVAIL=%d USED=%d, the used wrap "
                               "counter is %d: neither available nor used" % (
                                   position, bool(flags & _PACKED_F_AVAIL),
                                   bool(flags & _PACKED_F_USED), wrap))
                if fenced:
                    read_fence()
                buffer_id = words[8 * position + 6]
                length = lengths[4 * position + 2]
                token = slot_token[buffer_id] if buffer_id < size else None
                if token is not None:   # a slot: nothing to free
                    writable = slot_writable[buffer_id]
                    if length > writable:
                        if writable:
                            self.next_used, self.used_wrap = position, wrap
                            self._fail("used descriptor %d for buffer id %d claims %d bytes "
                                       "written, the chain has %d writable"
                                       % (position, buffer_id, length, writable))
                        length = 0   # see below
                    slot_token[buffer_id] = None
                    slots_done += 1
                    position += slot_size[buffer_id]
                else:
                    chain = chains.get(buffer_id)
                    if chain is None:
                        self.next_used, self.used_wrap = position, wrap
                        if buffer_id >= size:
                            self._fail("used descriptor %d names buffer id %d, the ring has %d"
                                       % (position, buffer_id, size))
                        self._fail("used descriptor %d names buffer id %d, which is not in "
                                   "flight" % (position, buffer_id))
                    if length > chain.writable:
                        if chain.writable:
                            self.next_used, self.used_wrap = position, wrap
                            self._fail("used descriptor %d for buffer id %d claims %d bytes "
                                       "written, the chain has %d writable"
                                       % (position, buffer_id, length, chain.writable))
                        # Nothing writable: DPDK 22.11 reports the bytes it read from a
                        # packed TX chain as its used length.
                        length = 0
                    del chains[buffer_id]
                    if chain.copy_out or chain.block is not None:
                        self._retire(chain)
                    self._free.append(buffer_id)
                    self._free_slots += len(chain.descs)
                    token = chain.token
                    position += len(chain.descs)
                if position >= size:
                    position -= size
                    wrap ^= 1
                    used_flags ^= _PACKED_F_BOTH
                    avail_flags ^= _PACKED_F_BOTH
                done.append((token, length))
                reaped += 1
        finally:
            self._slots_busy -= slots_done
        self.next_used, self.used_wrap = position, wrap
        return reaped > 0

    def _request_interrupt(self, ahead):
        # Each used chain moves the device at least one position, so the one
        # ``ahead`` past next_used is crossed by the time ahead + 1 are used.
        position, wrap = self.next_used + ahead, self.used_wrap
        if position >= self.size:
            position, wrap = position - self.size, wrap ^ 1
        self._store_driver_event(0, position | wrap << 15)
        self._store_driver_event(1, _EVENT_F_DESC)

    def __repr__(self):
        return "<Queue %d packed size=%d desc=%#x driver=%#x device=%#x next_avail=%d/%d>" % (
            self.index, self.size, self.desc_table, self.avail_ring, self.used_ring,
            self.next_avail, self.avail_wrap)


Queue._packed_layout = _PackedQueue


############################################################################
# Backend requests #########################################################
############################################################################

# Requests come from the back-end on the socketpair handed over with
# SET_BACKEND_REQ_FD; the front-end answers them (spec "Back-end message
# types"). Replies carry 0 for success or -errno as a u64, as crosvm and
# rust-vmm send it (QEMU sends 1; back-ends treat any non-zero as failure).

_B = BackendReq

#: Requests answered whether or not NEED_REPLY is set: the spec says so for
#: SHARED_OBJECT_LOOKUP, crosvm for its GPU_MAP and EXTERNAL_MAP.
_ALWAYS_REPLIED = frozenset([_B.SHARED_OBJECT_LOOKUP, _B.GPU_MAP, _B.EXTERNAL_MAP])

#: The fd counts a back-end request may carry; absent means none.
_BACKEND_REQ_FDS = {_B.SHMEM_MAP: (1,), _B.GPU_MAP: (1,), _B.VRING_HOST_NOTIFIER_MSG: (0, 1)}


def _errno_value(err):
    """-errno as the u64 a reply carries."""
    return (-err) & 0xFFFF_FFFF_FFFF_FFFF


class SharedMemoryRegion(NamedTuple):
    """The device's shared memory region (virtio "shared memory regions"): id and size."""
    id: int
    length: int


class _ShmemMapping(NamedTuple):
    shm_offset: int
    length: int
    writable: bool
    fd: int          # our own dup, for pread/pwrite on files that may shrink
    fd_offset: int
    direct: bool     # safe to dereference the mapping itself


class _ShmemMapper:
    """The built-in shared memory mapper: back-end fds mapped into one reserved range.

    The region is reserved as an inaccessible anonymous mapping; SHMEM_MAP maps
    the back-end's fd over part of it (``MAP_FIXED``, with the protection the
    back-end asked for) and SHMEM_UNMAP puts the inaccessible mapping back, so
    nothing else can land in the range while the device lives.

    Reading never faults, whatever the back-end does:

    - ranges nobody mapped are refused (``ValueError``), never dereferenced;
    - a mapping past the end of the back-end's file is refused at SHMEM_MAP
      (``fstat`` must cover ``fd_offset + len``);
    - a back-end may shrink its file later (``ftruncate``) and a load from the
      lost pages would SIGBUS us. So the mapping is read in place only when
      the file is sealed against shrinking (``F_SEAL_SHRINK``) or is not a
      regular file (dma-bufs and devices cannot be truncated); a regular
      unsealed file is read and written with ``pread``/``pwrite`` through our
      own dup of its fd, which see the same pages and return short instead
      of faulting. A short read raises ``ProtocolError``.

    All methods are thread-safe: the worker maps while the caller reads.
    """

    def __init__(self, region):
        if region.length <= 0 or region.length % _PAGE_SIZE:
            raise ValueError("shared memory region %d: length %#x is not a positive multiple "
                             "of the page size" % (region.id, region.length))
        self.region = region
        self._lock = threading.Lock()
        self._mappings = {}
        self._base = _mmap_raw(None, region.length, _PROT_NONE,
                               mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def add_mapping(self, fd, fd_offset, shm_offset, length, writable):
        """Map ``length`` bytes of ``fd`` at ``fd_offset`` to ``shm_offset`` (SHMEM_MAP).

        Raises:
            OSError: EINVAL for a bad range, an overlap or a file too small.
        """
        with self._lock:
            self._check_open()
            for name, value in (("fd_offset", fd_offset), ("shm_offset", shm_offset),
                                ("len", length)):
                if value % _PAGE_SIZE:
                    raise OSError(errno.EINVAL, "SHMEM_MAP: %s %#x is not page aligned"
                                  % (name, value))
            if length <= 0 or shm_offset + length > self.region.length:
                raise OSError(errno.EINVAL, "SHMEM_MAP: %#x + %#x is outside the %#x-byte "
                              "region" % (shm_offset, length, self.region.length))
            for other in self._mappings.values():
                if shm_offset < other.shm_offset + other.length and \
                        other.shm_offset < shm_offset + length:
                    raise OSError(errno.EINVAL, "SHMEM_MAP: %#x + %#x overlaps the mapping at "
                                  "%#x + %#x" % (shm_offset, length, other.shm_offset,
                                                 other.length))
            st = os.fstat(fd)
            regular = (st.st_mode & 0o170000) == 0o100000
            if regular and st.st_size < fd_offset + length:
                # Pages past EOF would SIGBUS on first touch.
                raise OSError(errno.EINVAL, "SHMEM_MAP: the file has %d bytes, the mapping "
                              "needs %d" % (st.st_size, fd_offset + length))
            direct = not regular or bool(_file_seals(fd) & _F_SEAL_SHRINK)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            own_fd = os.dup(fd)
            try:
                _mmap_raw(self._base + shm_offset, length, prot,
                          mmap.MAP_SHARED | _MAP_FIXED, fd, fd_offset)
            except BaseException:
                os.close(own_fd)
                raise
            self._mappings[shm_offset] = _ShmemMapping(
                shm_offset, length, bool(writable), own_fd, fd_offset, direct)

    def remove_mapping(self, shm_offset, length):
        """Unmap the mapping at ``shm_offset`` (SHMEM_UNMAP); it must match exactly.

        Raises:
            OSError: EINVAL when no mapping has that offset and length.
        """
        with self._lock:
            self._check_open()
            mapping = self._mappings.get(shm_offset)
            if mapping is None or mapping.length != length:
                raise OSError(errno.EINVAL, "SHMEM_UNMAP: no mapping at %#x + %#x"
                              % (shm_offset, length))
            self._unmap(mapping)

    def clear(self):
        """Drop every mapping (device reset, spec "SHMEM_MAP")."""
        with self._lock:
            for mapping in list(self._mappings.values()):
                self._unmap(mapping)

    def _unmap(self, mapping):
        _mmap_raw(self._base + mapping.shm_offset, mapping.length, _PROT_NONE,
                  mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED)
        del self._mappings[mapping.shm_offset]
        os.close(mapping.fd)

    def mappings(self):
        """(shm_offset, length, writable) of every mapping, by offset."""
        with self._lock:
            return sorted((m.shm_offset, m.length, m.writable) for m in self._mappings.values())

    def _find(self, offset, length, what):
        self._check_open()
        for mapping in self._mappings.values():
            if mapping.shm_offset <= offset and offset + length <= \
                    mapping.shm_offset + mapping.length:
                return mapping
        raise ValueError("%s: shared memory %#x + %#x is not inside one mapping"
                         % (what, offset, length))

    def read(self, offset, length):
        """Copy ``length`` bytes from the region at ``offset`` (it must be mapped)."""
        if not isinstance(length, int) or length < 0 or not isinstance(offset, int):
            raise ValueError("read(%r, %r): bad offset or length" % (offset, length))
        with self._lock:
            mapping = self._find(offset, length, "read")
            if mapping.direct:
                return ctypes.string_at(self._base + offset, length)
            position = mapping.fd_offset + offset - mapping.shm_offset
            data = os.pread(mapping.fd, length, position)
            if len(data) != length:
                raise ProtocolError("SHMEM_MAP: the back-end shrank the file mapped at %#x; "
                                    "read %d of %d bytes" % (mapping.shm_offset, len(data),
                                                             length), _B.SHMEM_MAP)
            return data

    def write(self, offset, data):
        """Copy ``data`` into a writable mapping at ``offset``."""
        data = bytes(data)
        with self._lock:
            mapping = self._find(offset, len(data), "write")
            if not mapping.writable:
                raise ValueError("write: the mapping at %#x is read-only" % mapping.shm_offset)
            if mapping.direct:
                ctypes.memmove(self._base + offset, data, len(data))
                return
            position = mapping.fd_offset + offset - mapping.shm_offset
            # Checked first: pwrite past the end would grow the back-end's file.
            if os.fstat(mapping.fd).st_size < position + len(data) or \
                    os.pwrite(mapping.fd, data, position) != len(data):
                raise ProtocolError("SHMEM_MAP: the back-end shrank the file mapped at %#x"
                                    % mapping.shm_offset, _B.SHMEM_MAP)

    def _check_open(self):
        if self._base is None:
            raise ValueError("shared memory region %d is closed" % self.region.id)

    def close(self):
        """Drop every mapping and the reservation; safe to call twice."""
        with self._lock:
            if self._base is None:
                return
            for mapping in self._mappings.values():
                os.close(mapping.fd)
            self._mappings.clear()
            _munmap(self._base, self.region.length)
            self._base = None

    def __repr__(self):
        return "<shared memory region %d: %d bytes, %d mapping(s)>" % (
            self.region.id, self.region.length, len(self._mappings))


#: A shared memory mapper: any object with ``add_mapping``, ``remove_mapping`` and
#: ``clear`` (see ``VhostUserFrontend.set_shared_memory_mapper``), or None.
_Mapper = Any


class BackendReqHandler:
    """Serves the back-end's requests on the channel set up with SET_BACKEND_REQ_FD.

    Every request of the spec (plus crosvm's GPU_MAP and EXTERNAL_MAP) has a
    method; a method returns the reply value (0 = success) or raises
    ``OSError(errno)``, answered as -errno. What is not supported is answered
    with an error and serving carries on (crosvm stops its worker there).
    A malformed payload, a wrong fd count or an unknown request code is
    answered with EINVAL or ENOSYS the same way. Only a broken stream (bad
    header flags, an oversized body, fds mid-message) ends serving.

    Replies are sent when REPLY_ACK was negotiated and the back-end set
    NEED_REPLY, and always for SHARED_OBJECT_LOOKUP, GPU_MAP and EXTERNAL_MAP.

    Subclass it to support more; the frontend takes a ``handler_factory``.
    The methods run on the frontend's worker thread, never while the
    front-end's request lock is held.

    Attributes:
        interrupt: the ``Interrupt`` of the active device, or None.
        queues: {index: Queue} of the active device.
        shared_objects: UUIDs the back-end registered with SHARED_OBJECT_ADD.
    """

    def __init__(self, sock: socket.socket, reply_ack: bool = False,
                 timeout: float = 5.0) -> None:
        """Serve on ``sock`` (our end of the socketpair; the handler owns it)."""
        self._channel = _Channel(sock, timeout)
        self.reply_ack = reply_ack
        self.interrupt = None
        self.queues = {}
        self.shared_objects = set()
        self._mapper_lock = threading.Lock()
        self._mapper = None  # type: _Mapper
        self._shmid = None  # type: Optional[int]
        self._dispatch = {
            _B.IOTLB_MSG: (lambda body, fds: self.iotlb_msg(_decode_iotlb(_B.IOTLB_MSG, body))),
            _B.CONFIG_CHANGE_MSG: self._config_change,
            _B.VRING_HOST_NOTIFIER_MSG: (lambda body, fds: self.vring_host_notifier_msg(
                _decode_vring_area(_B.VRING_HOST_NOTIFIER_MSG, body), fds[0] if fds else None)),
            _B.VRING_CALL: (lambda body, fds: self.vring_call(
                _decode_state(_B.VRING_CALL, body).index)),
            _B.VRING_ERR: (lambda body, fds: self.vring_err(
                _decode_state(_B.VRING_ERR, body).index)),
            _B.SHARED_OBJECT_ADD: (lambda body, fds: self.shared_object_add(
                _decode_uuid(_B.SHARED_OBJECT_ADD, body))),
            _B.SHARED_OBJECT_REMOVE: (lambda body, fds: self.shared_object_remove(
                _decode_uuid(_B.SHARED_OBJECT_REMOVE, body))),
            _B.SHARED_OBJECT_LOOKUP: self._shared_object_lookup,
            _B.SHMEM_MAP: (lambda body, fds: self.shmem_map(
                _decode_shmem_map(_B.SHMEM_MAP, body), fds[0])),
            _B.SHMEM_UNMAP: (lambda body, fds: self.shmem_unmap(
                _decode_shmem_map(_B.SHMEM_UNMAP, body))),
            _B.GPU_MAP: (lambda body, fds: self.gpu_map(
                _decode_struct(_B.GPU_MAP, _GPU_MAP, body), fds[0])),
            _B.EXTERNAL_MAP: (lambda body, fds: self.external_map(
                _decode_struct(_B.EXTERNAL_MAP, _EXTERNAL_MAP, body))),
        }

    def fileno(self) -> int:
        """The channel's fd (the worker polls it)."""
        return self._channel.fileno()

    def close(self) -> None:
        """Close the channel; safe to call twice."""
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    @property
    def closed(self) -> bool:
        return self._channel is None

    def set_shared_memory_mapper(self, mapper: _Mapper, shmid: Optional[int]) -> None:
        """Serve SHMEM_MAP/UNMAP for region ``shmid`` with ``mapper`` (None: refuse them)."""
        with self._mapper_lock:
            self._mapper = mapper
            self._shmid = shmid

    # -- serving ------------------------------------------------------------

    def handle_request(self) -> None:
        """Read, serve and answer one request (call when the channel is readable).

        Raises:
            Disconnected: the back-end closed the channel.
            ProtocolError: the stream cannot be trusted any more.
        """
        code, flags, size, fds = self._channel.recv_header("back-end request")
        try:
            request = _as_backend_req(code)
            name = _req_name(request)
            if flags & ~(_FLAG_VERSION_MASK | _FLAG_NEED_REPLY) or \
                    flags & _FLAG_VERSION_MASK != _VERSION:
                raise ProtocolError("%s: back-end request flags %#x, expected version 1 "
                                    "with only NEED_REPLY" % (name, flags), request)
            body = self._channel.recv_body(size, name)
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug("<- %s flags=%#x size=%d fds=%d", name, flags, size, len(fds))
            need_reply = request in _ALWAYS_REPLIED or bool(
                self.reply_ack and flags & _FLAG_NEED_REPLY)
            value, reply_fds = self._serve(request, name, body, fds, need_reply)
        finally:
            _close_fds(fds)
        try:
            if need_reply:
                self._channel.send(code, _VERSION | _FLAG_REPLY, _U64.pack(value), reply_fds,
                                   what=name + " reply")
        finally:
            _close_fds(reply_fds)

    def _serve(self, request, name, body, fds, need_reply):
        """(reply value, reply fds) for one request; errors become -errno."""
        handler = self._dispatch.get(request)
        try:
            if handler is None:
                raise OSError(errno.ENOSYS, "unknown request code")
            if len(fds) not in _BACKEND_REQ_FDS.get(request, (0,)):
                raise OSError(errno.EINVAL, "%d fd(s) attached" % len(fds))
            result = handler(body, fds)
        except ProtocolError as exc:
            _log.warning("%s: malformed back-end request, answered EINVAL: %s", name, exc)
            return _errno_value(errno.EINVAL), ()
        except OSError as exc:
            err = exc.errno or errno.EIO
            _log.warning("%s: answered %s: %s", name, errno.errorcode.get(err, err),
                         exc.strerror or exc)
            return _errno_value(err), ()
        except BaseException:
            # A bug in a handler method: answer so the back-end does not hang,
            # then let the worker fail loudly.
            if need_reply:
                try:
                    self._channel.send(int(request), _VERSION | _FLAG_REPLY,
                                       _U64.pack(_errno_value(errno.EIO)), what=name + " reply")
                except VhostUserError:
                    pass
            raise
        if isinstance(result, tuple):
            return result
        return result or 0, ()

    # -- one method per request -----------------------------------------------

    def iotlb_msg(self, msg: IotlbMsg) -> int:
        """IOTLB_MSG: an IOTLB miss; unsupported (we never offer ACCESS_PLATFORM)."""
        raise OSError(errno.ENOTSUP, "no IOMMU: ACCESS_PLATFORM is not supported")

    def _config_change(self, body, fds):
        if body:  # crosvm requires an empty payload
            raise ProtocolError("CONFIG_CHANGE_MSG: payload of %d bytes, expected none"
                                % len(body), _B.CONFIG_CHANGE_MSG)
        return self.config_change_msg()

    def config_change_msg(self) -> int:
        """CONFIG_CHANGE_MSG: the device config changed; tell the ``Interrupt``."""
        if self.interrupt is None:
            raise OSError(errno.ENOSYS, "no interrupt to signal")
        self.interrupt.signal_config_changed()
        return 0

    def vring_host_notifier_msg(self, area: VringArea, fd: Optional[int]) -> int:
        """VRING_HOST_NOTIFIER_MSG: accepted as deregistration only (kicks stay eventfds)."""
        if area.no_fd:
            return 0
        raise OSError(errno.ENOTSUP, "host notifiers are not used; kicks are eventfds")

    def vring_call(self, index: int) -> int:
        """VRING_CALL: an in-band call; signalled as the queue's interrupt."""
        queue = self.queues.get(index)
        if queue is None or self.interrupt is None:
            raise OSError(errno.EINVAL, "ring %d is not active" % index)
        self.interrupt.signal_used_queue(queue)
        return 0

    def vring_err(self, index: int) -> int:
        """VRING_ERR: the back-end found an error on a ring; logged."""
        if index not in self.queues:
            raise OSError(errno.EINVAL, "ring %d is not active" % index)
        _log.error("back-end reports an error on ring %d", index)
        return 0

    def shared_object_add(self, uuid: bytes) -> int:
        """SHARED_OBJECT_ADD: remember a UUID the back-end exports."""
        self.shared_objects.add(uuid)
        return 0

    def shared_object_remove(self, uuid: bytes) -> int:
        """SHARED_OBJECT_REMOVE: forget a UUID (only its owner may remove it)."""
        if uuid not in self.shared_objects:
            raise OSError(errno.ENOENT, "UUID %s is not registered" % uuid.hex())
        self.shared_objects.discard(uuid)
        return 0

    def _shared_object_lookup(self, body, fds):
        fd = self.shared_object_lookup(_decode_uuid(_B.SHARED_OBJECT_LOOKUP, body))
        return 0, (fd,)

    def shared_object_lookup(self, uuid: bytes) -> int:
        """SHARED_OBJECT_LOOKUP: the dma-buf fd of an object another device exports.

        This front-end drives one back-end, so there is nobody to ask: ENOENT.
        An override returns an fd, which is sent and then closed.
        """
        raise OSError(errno.ENOENT, "no other device exports UUID %s" % uuid.hex())

    def _checked_mapper(self, shmid):
        with self._mapper_lock:
            if self._mapper is None:
                raise OSError(errno.EINVAL, "no shared memory mapper is set")
            if shmid != self._shmid:
                raise OSError(errno.EINVAL, "shmid %d, the device's region is %d"
                              % (shmid, self._shmid))
            return self._mapper

    def shmem_map(self, msg: ShmemMap, fd: int) -> int:
        """SHMEM_MAP: map the back-end's fd into the shared memory region."""
        self._checked_mapper(msg.shmid).add_mapping(fd, msg.fd_offset, msg.shm_offset, msg.len,
                                                    bool(msg.flags & 1))
        return 0

    def shmem_unmap(self, msg: ShmemMap) -> int:
        """SHMEM_UNMAP: remove the mapping that covers exactly this range."""
        self._checked_mapper(msg.shmid).remove_mapping(msg.shm_offset, msg.len)
        return 0

    def gpu_map(self, msg: Tuple[Any, ...], fd: int) -> int:
        """GPU_MAP (crosvm): a Vulkan memory import; unsupported without a GPU."""
        raise OSError(errno.ENOTSUP, "Vulkan memory mapping is not supported")

    def external_map(self, msg: Tuple[Any, ...]) -> int:
        """EXTERNAL_MAP (crosvm): a host pointer of another process means nothing here."""
        raise OSError(errno.EPERM, "a pointer into another process cannot be mapped")

    def __repr__(self):
        return "<BackendReqHandler %s>" % ("closed" if self.closed else "open")


def _as_backend_req(code):
    try:
        return BackendReq(code)
    except ValueError:
        return code


def _decode_uuid(request, body):
    _expect_size(request, body, _UUID_SIZE)
    return bytes(body)


def _decode_struct(request, layout, body):
    _expect_size(request, body, layout.size)
    return layout.unpack(body)


############################################################################
# Worker ###################################################################
############################################################################

# crosvm's worker.rs: one thread per active device that serves what arrives
# asynchronously. It never touches the main socket except to notice its
# hang-up; every request/reply stays on the caller's thread.


#: A user callback (``Interrupt``'s ``on_*``); its return value is ignored.
_Callback = Optional[Callable[..., Any]]


class Interrupt:
    """How a program learns what crosvm tells the guest: used queues, config change, crash.

    Modes (``mode``), i.e. which eventfd SET_VRING_CALL gets for a queue:

    - ``"queue"`` (the default without ``on_used``): the queue's own
      ``queue.call``. The back-end signals it directly and the thread that
      wants completions waits on it; the worker is not involved (like
      crosvm's MSI-X irqfds, which go straight to KVM).
    - ``"shared"``: one eventfd for every queue, ``interrupt.shared``, like
      crosvm's non-MSI-X path. The worker drains it, then signals every
      active queue's ``queue.call`` and calls ``on_used(None)``.
    - ``"callback"`` (the default with ``on_used``): a private eventfd per
      queue that the worker watches; it signals ``queue.call`` and calls
      ``on_used(index)``.

    Whatever the mode, ``queue.call`` is signalled when a queue may have new
    used entries, so driver code can always wait on it (and must re-check the
    used index: back-ends signal spuriously).

    Config change (CONFIG_CHANGE_MSG) signals ``config_changed`` and calls
    ``on_config_changed()``. A crash (the main socket hung up, or the worker
    failed) sets ``crash_error``, signals ``crashed`` and calls
    ``on_crashed(error)``. A recovery (``VhostUserFrontend.reconnect``)
    clears ``crash_error``, counts one more in ``reconnects``, signals
    ``reconnected`` and calls ``on_reconnected()`` (on the thread that
    reconnected). Callbacks run on the worker thread, never under the
    client's lock, and before the matching event is signalled (so a thread
    woken by the event sees the callback's effects); an exception in one is
    logged and ignored. They may not call the frontend's lifecycle
    methods (that would join the thread they run on).

    Attributes:
        config_changed: an ``Event`` signalled on every config change.
        crashed: an ``Event`` signalled when the device crashed.
        crash_error: the current outage's exception, or None while the
            back-end is up.
        reconnected: an ``Event`` signalled after each recovery.
        reconnects: how many times the device recovered.
        shared: the shared ``Event`` in "shared" mode, else None.
    """

    QUEUE = "queue"
    SHARED = "shared"
    CALLBACK = "callback"

    def __init__(self, mode: Optional[str] = None, on_used: _Callback = None,
                 on_config_changed: _Callback = None, on_crashed: _Callback = None,
                 on_reconnected: _Callback = None) -> None:
        if mode is None:
            mode = self.CALLBACK if on_used is not None else self.QUEUE
        if mode not in (self.QUEUE, self.SHARED, self.CALLBACK):
            raise ValueError("Interrupt: mode %r is not 'queue', 'shared' or 'callback'"
                             % (mode,))
        self.mode = mode
        self.on_used = on_used
        self.on_config_changed = on_config_changed
        self.on_crashed = on_crashed
        self.on_reconnected = on_reconnected
        self.crash_error = None  # type: Optional[BaseException]
        self.reconnects = 0
        self.config_changed = self.crashed = self.reconnected = self.shared = None
        try:
            self.config_changed = Event()
            self.crashed = Event()
            self.reconnected = Event()
            if mode == self.SHARED:
                self.shared = Event()
        except BaseException:
            self.close()
            raise

    def signal_used_queue(self, queue: Optional[Queue]) -> None:
        """Tell waiters ``queue`` (a Queue; None: every queue) may have used entries."""
        self._callback(self.on_used, None if queue is None else queue.index)
        if queue is not None:
            queue.call.signal()

    def signal_config_changed(self) -> None:
        """Report a device config change."""
        self._callback(self.on_config_changed)
        self.config_changed.signal()

    def signal_crashed(self, error: BaseException) -> None:
        """Report that the device stopped working (crosvm DeviceCrashed)."""
        if self.crash_error is None:
            self.crash_error = error
        self._callback(self.on_crashed, error)
        self.crashed.signal()

    def signal_reconnected(self) -> None:
        """Report that the device works again after a crash (a new back-end connection)."""
        self.crash_error = None
        self.reconnects += 1
        self._callback(self.on_reconnected)
        self.reconnected.signal()

    @staticmethod
    def _callback(function, *args):
        if function is None:
            return
        try:
            function(*args)
        except Exception:
            _log.exception("Interrupt callback %r failed", function)

    def close(self) -> None:
        """Close the events; safe to call twice."""
        for event in (self.config_changed, self.crashed, self.reconnected, self.shared):
            if event is not None:
                event.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "<Interrupt %s%s>" % (self.mode, " crashed" if self.crash_error else "")


class _Worker:
    """One named thread: epoll over the stop event, the back-end request
    channel, the main socket's hang-up and the call events of the "shared"
    and "callback" modes (crosvm worker.rs).

    An exception in the thread is logged, reported through the Interrupt as
    a crash and kept in ``error`` for ``stop()`` to re-raise.
    """

    def __init__(self, name, interrupt, handler, main_fd, queues, proxies):
        self.name = name
        self.interrupt = interrupt
        self.handler = handler
        self.handler_closed = False
        self.main_fd = main_fd
        self.queues = queues
        self.proxies = proxies
        self.error = None
        self._stop = Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self):
        self._thread.start()

    def stop(self, timeout):
        """Stop and join the thread; returns the exception it failed with, or None."""
        self._stop.signal()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Leave the stop event open: the thread may still poll it.
            raise VhostUserTimeout("%s: worker thread did not stop within %.1f s "
                                   "(blocked in a callback?)" % (self.name, timeout))
        self._stop.close()
        return self.error

    def _run(self):
        poller = select.epoll()
        try:
            self._loop(poller)
        except BaseException as exc:
            self.error = exc
            _log.error("%s: worker failed: %s", self.name, exc, exc_info=True)
            self.interrupt.signal_crashed(exc)
        finally:
            poller.close()

    def _loop(self, poller):
        stop_fd = self._stop.fileno()
        handlers = {stop_fd: None}
        poller.register(stop_fd, select.EPOLLIN)
        if self.handler is not None:
            handlers[self.handler.fileno()] = self._serve_handler
            poller.register(self.handler.fileno(), select.EPOLLIN)
        # Hang-up only (mask 0: EPOLLHUP/EPOLLERR are always reported): the
        # replies on this socket belong to the caller's thread.
        handlers[self.main_fd] = self._main_hangup
        poller.register(self.main_fd, 0)
        if self.interrupt.shared is not None:
            handlers[self.interrupt.shared.fileno()] = self._shared_call
            poller.register(self.interrupt.shared.fileno(), select.EPOLLIN)
        for index, event in self.proxies.items():
            handlers[event.fileno()] = functools.partial(self._queue_call, index, event)
            poller.register(event.fileno(), select.EPOLLIN)
        while True:
            try:
                events = poller.poll()
            except InterruptedError:  # 3.4 retries EINTR itself (PEP 475); PyPy may not
                continue
            for fd, mask in events:
                handler = handlers.get(fd)
                if handler is None:
                    if fd == stop_fd:
                        return
                    continue  # unregistered earlier in this batch
                handler(poller, handlers, fd, mask)

    def _serve_handler(self, poller, handlers, fd, mask):
        try:
            self.handler.handle_request()
        except Disconnected:
            # crosvm: the back-end closed its request channel; stop watching.
            _log.info("%s: back-end request channel closed", self.name)
            poller.unregister(fd)
            del handlers[fd]
            self.handler_closed = True

    def _main_hangup(self, poller, handlers, fd, mask):
        poller.unregister(fd)
        del handlers[fd]
        error = Disconnected("%s: the back-end hung up the vhost-user socket" % self.name)
        _log.warning("%s", error)
        self.interrupt.signal_crashed(error)
        # Threads sleeping on a call event learn of the crash now, not at their
        # next periodic check: the sooner one reconnects, the shorter the outage.
        for queue in self.queues.values():
            queue.wake_waiter()

    def _shared_call(self, poller, handlers, fd, mask):
        if self.interrupt.shared.read():
            for queue in self.queues.values():
                queue.call.signal()
            self.interrupt.signal_used_queue(None)

    def _queue_call(self, index, event, poller, handlers, fd, mask):
        if event.read():
            self.interrupt.signal_used_queue(self.queues[index])


############################################################################
# VhostUserFrontend ########################################################
############################################################################

# crosvm's devices/src/virtio/vhost_user_frontend/mod.rs: the VirtioDevice a
# VMM holds for a device whose emulation lives in a vhost-user back-end.

#: Protocol features crosvm negotiates (mod.rs ``allow_protocol_features``).
#: REPLY_ACK is also what lets the back-end ask for replies on its channel.
_CROSVM_PROTOCOL_FEATURES = (_P.CONFIG | _P.MQ | _P.BACKEND_REQ | _P.DEVICE_STATE | _P.SHMEM
                            | _P.REPLY_ACK)

_STATE_MAGIC = b"VHUSTATE"
_STATE_HDR = struct.Struct("<8sHHIQQ")  # magic, version, reserved, device type, features, length
_STATE_CRC = struct.Struct("<I")
_STATE_VERSION = 1
#: Default cap on the device state a snapshot reads (VhostUserFrontend max_state_size).
_MAX_DEVICE_STATE = 1 << 30


class DeviceState(NamedTuple):
    """A stopped device's state: what ``virtio_snapshot`` returns and ``virtio_restore`` takes.

    ``to_bytes()`` gives a self-contained encoding, so a snapshot can go to a
    file and be restored by another process. Version 1, little-endian::

        offset  size  field
        0       8     magic b"VHUSTATE"
        8       2     version, 1
        10      2     reserved, 0
        12      4     device_type (virtio device ID)
        16      8     acked_features
        24      8     n = len(backend_state)
        32      n     backend_state (the bytes the back-end streamed)
        32+n    4     CRC-32 (binascii.crc32) of bytes 0 .. 32+n

    A reader refuses another version, a bad magic, length or checksum.
    """
    device_type: int
    acked_features: int
    backend_state: bytes

    def to_bytes(self) -> bytes:
        """The versioned encoding described in the class docstring."""
        head = _STATE_HDR.pack(_STATE_MAGIC, _STATE_VERSION, 0, int(self.device_type),
                               int(self.acked_features), len(self.backend_state))
        data = head + bytes(self.backend_state)
        return data + _STATE_CRC.pack(binascii.crc32(data) & 0xFFFF_FFFF)

    @classmethod
    def from_bytes(cls, data: _Buffer) -> "DeviceState":
        """Decode ``to_bytes()`` output.

        Raises:
            ValueError: not a version-1 device state, truncated or corrupted.
        """
        data = bytes(data)
        if len(data) < _STATE_HDR.size + _STATE_CRC.size:
            raise ValueError("DeviceState: %d bytes is shorter than the %d-byte header"
                             % (len(data), _STATE_HDR.size + _STATE_CRC.size))
        magic, version, reserved, device_type, features, length = _STATE_HDR.unpack_from(data)
        if magic != _STATE_MAGIC:
            raise ValueError("DeviceState: magic %r, expected %r" % (magic, _STATE_MAGIC))
        if version != _STATE_VERSION or reserved:
            raise ValueError("DeviceState: version %d (reserved %d), this module reads "
                             "version %d" % (version, reserved, _STATE_VERSION))
        end = _STATE_HDR.size + length
        if len(data) != end + _STATE_CRC.size:
            raise ValueError("DeviceState: %d bytes, the header announces %d"
                             % (len(data), end + _STATE_CRC.size))
        crc, = _STATE_CRC.unpack_from(data, end)
        if crc != binascii.crc32(data[:end]) & 0xFFFF_FFFF:
            raise ValueError("DeviceState: checksum mismatch (corrupted state)")
        try:
            device_type = DeviceType(device_type)
        except ValueError:
            pass
        return cls(device_type, features, data[_STATE_HDR.size:end])


def _largest_power_of_two(value):
    """The largest power of two <= ``value`` (crosvm power_of_two_le)."""
    return 1 << (value.bit_length() - 1)


# Inflight I/O tracking (vhost-user spec, "Inflight I/O tracking", split
# virtqueues). The buffer GET_INFLIGHT_FD returns holds one region per queue:
# a header (features u64, version u16, desc_num u16, last_batch_head u16,
# used_idx u16), then one DescStateSplit per descriptor (inflight u8, 5 bytes
# padding, next u16, counter u64). The back-end sets ``inflight`` on each head
# it takes from the avail ring, clears it once the head is in the used ring,
# and after a restart (SET_INFLIGHT_FD with the same buffer) resubmits the
# flagged heads by itself, oldest counter first, and resumes the avail ring at
# SET_VRING_BASE plus their number (DPDK; libvhost-user at used->idx plus
# their number, the same base as rewind sends). A front-end only keeps the
# buffer. This one is also the driver, so it reads it at a reconnect to leave
# those chains out of what the avail ring offers again: with pread, never a
# mapping, so a back-end that shrinks the file cannot SIGBUS us.
_INFLIGHT_QUEUE = struct.Struct("<QHHHH")   # features, version, desc_num, last_batch_head, used_idx
_INFLIGHT_DESC = struct.Struct("<B5xHQ")    # inflight, next, counter
_INFLIGHT_VERSION = 1
#: The access mode bits of the file status flags (Linux). ``os.O_ACCMODE`` is
#: missing on PyPy 3.9.
_O_ACCMODE = getattr(os, "O_ACCMODE", os.O_RDONLY | os.O_WRONLY | os.O_RDWR)


class _InflightRegion:
    """The back-end's inflight buffer (GET_INFLIGHT_FD), kept for the device's life.

    Validates the reply before anything is used: the buffer must hold
    ``num_queues`` regions of ``queue_size`` descriptors, at a page-aligned
    offset (the back-end maps it there), in a read-write file at least that
    long. A bad value raises ``ProtocolError`` naming the field; the fd is
    closed then.
    """

    def __init__(self, info, fd, num_queues, queue_size):
        self.fd = fd
        try:
            need = _INFLIGHT_QUEUE.size + queue_size * _INFLIGHT_DESC.size
            self._check(info, num_queues, need)
        except BaseException:
            self.close()
            raise
        self.info = info
        self.num_queues = num_queues
        self.queue_size = queue_size
        # libvhost-user and DPDK both place region i at i * (mmap_size / num_queues).
        self.stride = info.mmap_size // num_queues

    def _check(self, info, num_queues, need):
        def bad(message):
            raise ProtocolError("GET_INFLIGHT_FD: " + message, FrontendReq.GET_INFLIGHT_FD)
        if info.mmap_size // num_queues < need:
            bad("mmap_size %d cannot hold %d queue region(s) of %d bytes"
                % (info.mmap_size, num_queues, need))
        if info.mmap_offset % mmap.PAGESIZE:
            bad("mmap_offset %d is not a multiple of the page size (%d)"
                % (info.mmap_offset, mmap.PAGESIZE))
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            bad("the fd is not a shared memory file (mode %#o)" % st.st_mode)
        if st.st_size < info.mmap_offset + info.mmap_size:
            bad("the fd holds %d bytes, mmap_offset %d + mmap_size %d do not fit"
                % (st.st_size, info.mmap_offset, info.mmap_size))
        if fcntl.fcntl(self.fd, fcntl.F_GETFL) & _O_ACCMODE != os.O_RDWR:
            bad("the fd is not open for reading and writing")

    def cut_short(self):
        """The file's size if it no longer covers the buffer (the back-end shrank it), else None."""
        size = os.fstat(self.fd).st_size
        return size if size < self.info.mmap_offset + self.info.mmap_size else None

    def taken(self, index, used_idx, waiting, label):
        """The heads of queue ``index`` the back-end will resubmit itself, oldest first.

        ``waiting`` are the heads in flight that used->idx (``used_idx``) does
        not cover. The region is first brought in line with them, as the spec
        has the back-end do at a reconnect, and written back: the flags of a
        batch published in the used ring but not cleared are cleared, and so
        is a flag on any head that holds no chain in flight (the driver knows
        better). A region that cannot be read that way is logged and cleared
        (version 0), so the back-end resubmits nothing and the driver's own
        record offers every chain again.
        """
        size = self.queue_size
        offset = self.info.mmap_offset + index * self.stride
        length = _INFLIGHT_QUEUE.size + size * _INFLIGHT_DESC.size
        first = _INFLIGHT_QUEUE.size
        try:
            data = bytearray(os.pread(self.fd, length, offset))
        except OSError as exc:
            raise ProtocolError("SET_INFLIGHT_FD: cannot read the inflight buffer of queue %d: "
                                "%s" % (index, exc.strerror), FrontendReq.SET_INFLIGHT_FD) \
                from exc
        problem = None
        if len(data) < length:
            problem = "the buffer was cut to %d bytes" % (len(data),)
        else:
            _, version, desc_num, head, region_used = _INFLIGHT_QUEUE.unpack_from(data)
            if version == 0:
                return []      # never started: the back-end took nothing it would resubmit
            if version != _INFLIGHT_VERSION:
                problem = "version %d" % version
            elif desc_num != size:
                problem = "desc_num %d for a queue of %d" % (desc_num, size)
        if problem is None and region_used != used_idx:
            # Spec, "When reconnecting": used->idx moved past the region's
            # used_idx, so the last batch (a list from last_batch_head through
            # ``next``) reached the used ring with its flags still set.
            for _ in range(min((used_idx - region_used) & 0xFFFF, size)):
                if head >= size:
                    problem = "last batch names descriptor %d" % head
                    break
                data[first + head * _INFLIGHT_DESC.size] = 0
                head = _INFLIGHT_DESC.unpack_from(data, first + head * _INFLIGHT_DESC.size)[1]
        if problem is not None:
            _log.warning("%s: queue %d: the inflight buffer is unusable (%s); it is cleared and "
                         "the driver offers every chain in flight again", label, index, problem)
            data = bytearray(length)
        else:
            _INFLIGHT_QUEUE.pack_into(data, 0, *_INFLIGHT_QUEUE.unpack_from(data)[:4] + (used_idx,))
        counters = {}
        for head in range(size if problem is None else 0):
            at = first + head * _INFLIGHT_DESC.size
            if data[at]:
                if head in waiting:
                    data[at] = 1
                    counters[head] = _INFLIGHT_DESC.unpack_from(data, at)[2]
                else:
                    data[at] = 0       # no chain of ours: resubmitting it would be wrong
        try:
            os.pwrite(self.fd, data, offset)
        except OSError as exc:
            raise ProtocolError("SET_INFLIGHT_FD: cannot write the inflight buffer of queue "
                                "%d: %s" % (index, exc.strerror), FrontendReq.SET_INFLIGHT_FD) \
                from exc
        return sorted(counters, key=counters.get)

    def close(self):
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


#: futex(2) numbers, for the atomic bit clear of ``DirtyLog.clear``.
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "riscv64": 98, "ppc64le": 221, "s390x": 238,
              "i686": 240, "armv7l": 240}
_FUTEX_WAKE_OP_PRIVATE = 5 | 128
_FUTEX_OP_ANDN = 3
_FUTEX_OP_OPARG_SHIFT = 8


def _atomic_clear_bits(address, bits):
    """Atomically clear ``bits`` of the aligned 32-bit word at ``address``.

    Python has no atomic read-modify-write on shared memory, and a plain
    store of the word would lose a bit a back-end sets between our read and
    our write. FUTEX_WAKE_OP makes the kernel do ``*word &= ~arg`` with one
    atomic instruction (and wake nobody). ``arg`` is a 12-bit field that the
    kernel sign-extends: bit 11 would make it clear bits 11-31 too, so one
    op takes bits 0-10 and bits 11-31 go one at a time with OPARG_SHIFT.
    """
    libc = _libc()
    number = _SYS_FUTEX[os.uname().machine]
    word = ctypes.c_void_p(address)
    low, bits = bits & 0x7FF, bits & ~0x7FF
    ops = [(_FUTEX_OP_ANDN << 28) | (low << 12)] if low else []
    while bits:
        bit = (bits & -bits).bit_length() - 1
        bits &= bits - 1
        ops.append(((_FUTEX_OP_ANDN | _FUTEX_OP_OPARG_SHIFT) << 28) | (bit << 12))
    for op in ops:
        _retry_eintr(lambda: libc.syscall(ctypes.c_long(number), word,
                                          ctypes.c_int(_FUTEX_WAKE_OP_PRIVATE), ctypes.c_int(0),
                                          ctypes.c_void_p(0), word, ctypes.c_uint(op)),
                     "futex(FUTEX_WAKE_OP)")


class DirtyLog:
    """The pages a back-end wrote while logging: what ``start_dirty_log`` returns.

    The log is a memfd of one bit per 4 KiB page of guest memory, shared
    with the back-end by SET_LOG_BASE (LOG_SHMFD); the back-end sets the bit
    of every guest page it writes (buffers it fills, used-ring entries and
    indices). The driver's own writes are not logged. ``pages()`` reads the
    bits; ``clear()`` takes and clears them atomically against a back-end
    setting more; ``stop()`` ends logging (SET_FEATURES without LOG_ALL, the
    rings without VHOST_VRING_F_LOG) and frees the log.

    Attributes:
        mmap_size: the log's size in bytes, as SET_LOG_BASE sent it.
        page_count: guest pages the log covers (page n is GPA n * 4096).
    """

    page_size = _LOG_PAGE
    _map = None  # type: Optional[mmap.mmap]
    _fd = None  # type: Optional[int]

    def __init__(self, frontend: "VhostUserFrontend", page_count: int) -> None:
        self._frontend = frontend
        self._client = frontend.client
        self.page_count = page_count
        # Rounded to whole pages of the memfd: a back-end maps whole pages,
        # and one past the file's end would SIGBUS it.
        self.mmap_size = -(-page_count // (8 * mmap.PAGESIZE)) * mmap.PAGESIZE
        self._lock = threading.Lock()
        self.active = False
        self._fd = _memfd_create("vhost-user-dirty-log", self.mmap_size)
        try:
            self._map = mmap.mmap(self._fd, self.mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
            self._address, self._anchor = _mapping_address(self._map)
        except BaseException:
            self._free()
            raise

    def fileno(self) -> int:
        """The memfd sent with SET_LOG_BASE."""
        return self._fd

    def _words(self):
        """(byte offset, value) of each non-zero 32-bit word of the log."""
        data = self._map[:]
        words = array.array("I", data)
        if sys.byteorder != "little":
            words.byteswap()
        return [(4 * i, word) for i, word in enumerate(words) if word]

    @staticmethod
    def _page_numbers(marked):
        pages = []
        for offset, word in marked:
            base = 8 * offset
            while word:
                low = word & -word
                pages.append(base + low.bit_length() - 1)
                word ^= low
        return pages

    def pages(self) -> List[int]:
        """The sorted guest page numbers (GPA // 4096) marked since the start or ``clear()``."""
        with self._lock:
            self._check_open("pages")
            return self._page_numbers(self._words())

    def clear(self) -> List[int]:
        """Clear the log; returns the pages it held (sorted), each cleared atomically.

        Only the bits read are cleared, each with an atomic and-not: a bit the
        back-end sets meanwhile stays for the next ``pages()``. A page
        written again between the read and the clear is in the list returned,
        so a copy of those pages taken after ``clear()`` returns has it.
        """
        with self._lock:
            self._check_open("clear")
            marked = self._words()
            for offset, word in marked:
                bits = word if sys.byteorder == "little" else \
                    int.from_bytes(word.to_bytes(4, "little"), "big")
                _atomic_clear_bits(self._address + offset, bits)
            return self._page_numbers(marked)

    def _check_open(self, what):
        if self._map is None:
            raise ValueError("DirtyLog.%s: the log was stopped" % what)

    def stop(self) -> None:
        """End logging on the back-end (when still connected) and free the log; idempotent."""
        frontend, self._frontend = self._frontend, None
        try:
            if frontend is not None and frontend._dirty_log is self:
                frontend._dirty_log = None
                if self.active and frontend.client is self._client and \
                        self._client.broken is None:
                    frontend._log_rings()
        finally:
            self.active = False
            with self._lock:
                self._free()

    def _free(self):
        self._anchor = None
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    close = stop

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return "<DirtyLog %d pages, %s>" % (self.page_count,
                                           "logging" if self.active else "stopped")


#: What a device connects to: a socket path, a connected socket, or a ``BackendClient``.
_Connection = Union[str, bytes, os.PathLike, socket.socket, BackendClient]


class VhostUserFrontend:
    """A virtio device whose emulation runs in a vhost-user back-end (crosvm's VhostUserFrontend).

    Construction does crosvm's negotiation: RING_PACKED is stripped from
    ``base_features`` unless ``packed=True``, SET_OWNER, GET_FEATURES,
    GET/SET_PROTOCOL_FEATURES (offered & ``protocol_features``) when bit 30
    is offered, SET_BACKEND_REQ_FD when BACKEND_REQ was negotiated, and the
    queue count from GET_QUEUE_NUM (MQ) or ``DeviceType.min_queues``.
    SET_FEATURES waits for ``ack_features`` or ``activate``.

    The lifecycle methods keep crosvm's names and order of requests and raise
    what goes wrong (crosvm logs some and carries on). Differences from crosvm
    that a caller can see: ``reset`` drops every SHMEM mapping; a back-end that
    hangs up is reported through the ``Interrupt`` and the object stays usable
    for ``close()``; unsupported back-end requests are answered with an error
    instead of ending the worker; one kick is written after SET_VRING_KICK
    (``start_kick``); ``DeviceState`` has a byte encoding.

    Args:
        device_type: a ``DeviceType``.
        base_features: transport features the VMM supports (e.g. VERSION_1,
            RING_EVENT_IDX); device-specific bits are always allowed.
        connection: a socket path, a connected unix socket, or a
            ``BackendClient``. The frontend owns it from the call on, also
            when construction fails.
        max_queue_size: queue size limit, rounded down to a power of two
            (default 32768).
        timeout: seconds to wait for any reply, pipe transfer or thread join.
        protocol_features: the protocol features we may negotiate.
        start_kick: write one kick after SET_VRING_KICK (the newest spec says
            a ring starts there and QEMU does it); False for crosvm's behaviour.
        handler_factory: ``f(sock, reply_ack=, timeout=)`` building the
            ``BackendReqHandler`` (to serve more back-end requests).
        max_state_size: the most bytes ``virtio_snapshot`` accepts from the
            back-end; a back-end that streams more (or hands back an endless
            fd such as /dev/zero) gets ``ProtocolError`` instead of filling
            memory.
        packed: keep RING_PACKED of ``base_features`` so it may be acked
            (crosvm strips it; the default does too). The queues must then
            be built with the features acked (``Queue(..., features=)``).

    Attributes:
        client: the ``BackendClient``.
        acked_features: the features acked so far (bit 30 included from the start).
        protocol_features: the negotiated protocol features.
        interrupt: the active device's ``Interrupt``, or None.
    """

    client = None  # type: Optional[BackendClient]
    _handler = None  # type: Optional[BackendReqHandler]
    _worker = None  # type: Optional[_Worker]
    # The back-end's _InflightRegion (INFLIGHT_SHMFD), once asked.
    _inflight = None  # type: Optional[_InflightRegion]
    #: A device's check of a back-end that came back (``reconnect``) or that it
    #: moves to (``move_to``), called with the frontend and that name before
    #: the rings go there (BlockDevice re-reads its config); raises
    #: ``Disconnected`` when the device cannot use it, else returns a callable
    #: that records what it read, called once the device uses that back-end.
    reconnect_check = None
    _dirty_log = None  # type: Optional[DirtyLog]  # the one the back-end writes while logging
    moves = 0             # successful move_to calls
    moved_in_flight = 0   # chains the last move_to offered the new back-end again

    def __init__(self, device_type: int, base_features: int, connection: _Connection,
                 max_queue_size: Optional[int] = None, timeout: float = 5.0,
                 protocol_features: int = _CROSVM_PROTOCOL_FEATURES, start_kick: bool = True,
                 handler_factory: Callable[..., BackendReqHandler] = BackendReqHandler,
                 max_state_size: int = _MAX_DEVICE_STATE, packed: bool = False) -> None:
        self._device_type = DeviceType(device_type)
        self.timeout = timeout
        self.start_kick = start_kick
        self.max_state_size = max_state_size
        self.acked_features = 0
        self.protocol_features = ProtocolFeature(0)
        self.interrupt = None  # type: Optional[Interrupt]
        self._own_interrupt = None  # type: Optional[Interrupt]
        self._sent_features = None    # what SET_FEATURES last sent since reset
        self._sent_queues = None  # type: Optional[Dict[int, Queue]]  # what the back-end runs
        self._proxies = {}            # callback mode: {index: Event} given to the back-end
        self._sleeping = None  # type: Any  # (mem, interrupt, queues) from sleep to wake
        self._mem = None  # type: Optional[GuestMemory]
        # None: not asked yet; then a SharedMemoryRegion or False.
        self._shmem_region = None  # type: Any
        self._mapper = None  # type: _Mapper
        self._own_mapper = None  # type: Optional[_ShmemMapper]
        base_features = int(base_features)
        if base_features & VirtioFeature.RING_PACKED and not packed:
            # crosvm b/331466964: no packed ring support in its protocol layer.
            base_features &= ~VirtioFeature.RING_PACKED
            _log.warning("%s: RING_PACKED requested without packed=True; disabled",
                         self.debug_label())
        # Kept for reconnect, which negotiates again the same way.
        self._negotiation = (base_features, ProtocolFeature(int(protocol_features)),
                             max_queue_size, handler_factory)
        try:
            self.client = self._connect(connection, timeout)
            self._negotiate(*self._negotiation)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _connect(connection, timeout):
        if isinstance(connection, BackendClient):
            return connection
        if isinstance(connection, socket.socket):
            return BackendClient(connection, timeout)
        if isinstance(connection, (str, bytes, os.PathLike)):
            # ``timeout`` bounds the wait for the socket as well as each reply.
            return BackendClient.connect(os.fspath(connection), timeout=timeout,
                                         reply_timeout=timeout)
        raise TypeError("connection must be a path, a socket or a BackendClient, not %r"
                        % (connection,))

    def _negotiate(self, base_features, allowed_protocol, max_queue_size, handler_factory):
        client = self.client
        client.set_owner()
        allowed = (_DEVICE_SPECIFIC_FEATURES | base_features
                   | VirtioFeature.PROTOCOL_FEATURES)
        self._avail_features = allowed & client.get_features()
        if self._avail_features & VirtioFeature.PROTOCOL_FEATURES:
            # GET/SET_PROTOCOL_FEATURES are legal before SET_FEATURES, and bit
            # 30 rides on every later SET_FEATURES (rust-vmm/vhost#227).
            self.acked_features = int(VirtioFeature.PROTOCOL_FEATURES)
            offered = client.get_protocol_features()
            client.set_protocol_features(offered & allowed_protocol)
            self.protocol_features = client.protocol_features
        if self.protocol_features & _P.BACKEND_REQ:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._handler = handler_factory(
                    ours, reply_ack=bool(self.protocol_features & _P.REPLY_ACK),
                    timeout=self.timeout)
            except BaseException:
                ours.close()
                theirs.close()
                raise
            with theirs:
                client.set_backend_req_fd(theirs)
        if self.protocol_features & _P.MQ:
            num_queues = client.get_queue_num()
        else:
            num_queues = self._device_type.min_queues
            client.queue_num = num_queues
        size = MAX_QUEUE_SIZE
        if max_queue_size is not None:
            if not isinstance(max_queue_size, int) or max_queue_size < 1:
                raise ValueError("max_queue_size must be a positive int, not %r"
                                 % (max_queue_size,))
            size = min(size, _largest_power_of_two(max_queue_size))
        self._queue_sizes = [size] * num_queues
        _log.info("%s: %d queue(s) of up to %d entries, features %#x, protocol features %#x",
                  self.debug_label(), num_queues, size, self._avail_features,
                  int(self.protocol_features))

    # -- VirtioDevice ---------------------------------------------------------

    def debug_label(self) -> str:
        """A short name for logs: ``vu-`` and the device type."""
        return "vu-%s" % self._device_type.name.lower()

    def device_type(self) -> DeviceType:
        """The ``DeviceType``."""
        return self._device_type

    def queue_max_sizes(self) -> List[int]:
        """The largest size of each queue, one entry per queue the device has."""
        return list(self._queue_sizes)

    def features(self) -> int:
        """Features the driver may ack: back-end & (device bits | base | bit 30)."""
        return self._avail_features

    def ack_features(self, value: int) -> None:
        """Ack ``value`` (limited to ``features()``); SET_FEATURES only when the set changed."""
        self._check_usable("ack_features")
        features = (int(value) & self._avail_features) | self.acked_features
        # While logging, LOG_ALL rides on every SET_FEATURES (a transport bit,
        # never acked to a driver).
        wire = features | (VirtioFeature.LOG_ALL if self._dirty_log is not None else 0)
        if wire != self._sent_features:
            self.client.set_features(wire)
            self._sent_features = wire
        self.acked_features = features

    def read_config(self, offset: int, length: int) -> bytes:
        """``length`` bytes of device config space at ``offset`` (GET_CONFIG)."""
        self._check_usable("read_config")
        return self.client.get_config(offset, length)

    def write_config(self, offset: int, data: _Buffer) -> None:
        """Write ``data`` into the device config space at ``offset`` (SET_CONFIG)."""
        self._check_usable("write_config")
        self.client.set_config(offset, data)

    # -- activation -----------------------------------------------------------

    def activate(self, mem: GuestMemory, interrupt: Optional[Interrupt],
                 queues: Union[Dict[int, Queue], Sequence[Queue]]) -> None:
        """Hand guest memory and queues to the back-end and start the worker.

        Sends SET_FEATURES (when not sent since the last reset), SET_MEM_TABLE,
        then per queue in index order SET_VRING_NUM, SET_VRING_ADDR (host
        addresses), SET_VRING_BASE (``vring_base``), SET_VRING_CALL,
        SET_VRING_KICK (plus one kick with ``start_kick``) and, when bit 30
        was acked, SET_VRING_ENABLE(1). Each queue's ``features`` become the
        acked features.

        Args:
            mem: the ``GuestMemory`` the queues live in.
            interrupt: an ``Interrupt``, or None for a per-queue one the
                frontend owns.
            queues: {index: Queue} or a list of Queue (indices from ``.index``).

        Raises:
            RuntimeError: already active.
            ValueError: a queue index or size the device does not have, or a
                queue whose layout (``Queue.packed``) is not what the acked
                RING_PACKED says; nothing is sent then.
        """
        self._check_usable("activate")
        if self._sent_queues is not None:
            raise RuntimeError("activate: %s is already active; reset() or virtio_sleep() "
                               "first" % self.debug_label())
        if isinstance(queues, dict):
            queues = dict(queues)
        else:
            queues = {queue.index: queue for queue in queues}
        for index, queue in sorted(queues.items()):
            if not 0 <= index < len(self._queue_sizes):
                raise ValueError("activate: queue index %r, the device has queues 0..%d"
                                 % (index, len(self._queue_sizes) - 1))
            if queue.size > self._queue_sizes[index]:
                raise ValueError("activate: queue %d has size %d, the maximum is %d"
                                 % (index, queue.size, self._queue_sizes[index]))
            if queue.packed != bool(self.acked_features & VirtioFeature.RING_PACKED):
                raise ValueError("activate: queue %d is %s but RING_PACKED is %sacked; build "
                                 "it with features=frontend.acked_features"
                                 % (index, "packed" if queue.packed else "split",
                                    "not " if queue.packed else ""))
        if interrupt is None:
            if self._own_interrupt is None:
                self._own_interrupt = Interrupt()
            interrupt = self._own_interrupt
        self._sleeping = None
        self.interrupt = interrupt
        self._mem = mem
        self._sent_queues = {}
        try:
            if self._sent_features != self.acked_features:
                self.ack_features(self.acked_features)
            self._send_rings(mem, interrupt, queues)
        except BaseException:
            # Stop what did start, so the device is inactive again (activate
            # may be retried) and no ring keeps writing guest memory.
            try:
                self._stop_rings(reclaim=False)
            except Exception as cleanup_exc:
                _log.warning("%s: stopping the rings after a failed activate: %s",
                             self.debug_label(), cleanup_exc)
            self._sent_features = None
            raise

    def _send_rings(self, mem, interrupt, queues):
        """SET_INFLIGHT_FD, SET_MEM_TABLE, every ring in index order, then the worker."""
        self._send_inflight(queues)
        self.client.set_mem_table(mem.regions())
        for index, queue in sorted(queues.items()):
            if interrupt.mode == Interrupt.QUEUE:
                call = queue.call
            elif interrupt.mode == Interrupt.SHARED:
                call = interrupt.shared
            else:
                call = self._proxies[index] = Event()
            # The ring follows the negotiated features (EVENT_IDX, INDIRECT_DESC), as a
            # transport applies them to its queues: a queue left at features=0 while
            # EVENT_IDX is acked would never re-arm used_event and lose interrupts.
            queue.features = self.acked_features
            self._sent_queues[index] = queue  # from here on it must be stopped
            self._activate_vring(mem, index, queue, call)
        self._start_worker(interrupt)

    def _send_inflight(self, queues):
        """With INFLIGHT_SHMFD: GET_INFLIGHT_FD once, SET_INFLIGHT_FD at every start.

        QEMU's order (vhost_user_blk_start): after SET_FEATURES and before
        vhost_dev_start's SET_MEM_TABLE and rings, the buffer fetched once
        and kept (a new one after ``reset``), and handed back at each start;
        libvhost-user tracks nothing until it gets SET_INFLIGHT_FD. A back-end
        that answers mmap_size 0 keeps no buffer, and none is sent.
        """
        if not self.protocol_features & _P.INFLIGHT_SHMFD or not queues:
            return
        if self.acked_features & VirtioFeature.RING_PACKED:
            # Packed rings have another region layout (spec, DescStatePacked),
            # which this driver does not read: the driver's own record of
            # what is in flight is what a reconnect offers again there.
            return
        sizes = set(queue.size for queue in queues.values())
        if len(sizes) != 1:
            _log.info("%s: queues of sizes %s: GET_INFLIGHT_FD describes one size, no inflight "
                      "buffer is used", self.debug_label(), sorted(sizes))
            return
        size = sizes.pop()
        num_queues = max(queues) + 1
        region = self._inflight
        if region is None or region.num_queues < num_queues or region.queue_size != size:
            self._close_inflight()
            info, fd = self.client.get_inflight_fd(num_queues, size)
            if fd is None:
                _log.info("%s: the back-end keeps no inflight buffer (mmap_size 0)",
                          self.debug_label())
                return
            self._inflight = region = _InflightRegion(info, fd, num_queues, size)
        self.client.set_inflight_fd(region.info, region.fd)

    def _close_inflight(self):
        region, self._inflight = self._inflight, None
        if region is not None:
            region.close()

    def _activate_vring(self, mem, index, queue, call):
        client = self.client
        client.set_vring_num(index, queue.size)
        self._send_vring_addr(mem, index, queue)
        client.set_vring_base(index, queue.vring_base)
        client.set_vring_call(index, call)
        client.set_vring_kick(index, queue.kick)
        if self.start_kick:
            # Spec (newest) "Ring states": a ring starts on SET_VRING_KICK and
            # the front-end should kick once, for buffers already available.
            queue.kick.signal()
        # Spec: SET_VRING_ENABLE only once PROTOCOL_FEATURES was acked.
        if self.acked_features & VirtioFeature.PROTOCOL_FEATURES:
            client.set_vring_enable(index, True)

    def _send_vring_addr(self, mem, index, queue):
        """SET_VRING_ADDR, with VHOST_VRING_F_LOG and the log address while logging.

        The log address is where the back-end logs its ring writes: the used
        ring of a split ring. For a packed ring the device writes descriptors
        back into the descriptor ring, and DPDK 22.11 logs them at their
        offset in that ring from the log address, so it is the descriptor
        ring's GPA (QEMU sends the device area there).
        """
        flags = log = 0
        if self._dirty_log is not None:
            flags = 1
            log = queue.desc_table if queue.packed else queue.used_ring
        self.client.set_vring_addr(index, mem.host_address(queue.desc_table),
                                   mem.host_address(queue.used_ring),
                                   mem.host_address(queue.avail_ring), log=log, flags=flags)

    def _deactivate_vring(self, index, packed=False):
        """Disable then stop a ring; returns its base (crosvm deactivate_vring).

        A split ring's base is 16 bits; a packed ring's is 32 (avail and used
        positions with their wrap counters), decoded by ``Queue.reclaim``.

        A refused disable (an error ack) still gets GET_VRING_BASE, which is
        what stops the ring: one left running would go on writing guest
        memory the caller believes idle. The refusal is raised after it.
        """
        refused = None
        if self.acked_features & VirtioFeature.PROTOCOL_FEATURES:
            try:
                self.client.set_vring_enable(index, False)
            except BackendError as exc:
                refused = exc
        base = self.client.get_vring_base(index)
        if base > 0xFFFF and not packed:
            raise ProtocolError("GET_VRING_BASE: base %#x of ring %d does not fit in 16 bits"
                                % (base, index), FrontendReq.GET_VRING_BASE)
        if refused is not None:
            raise refused
        return base

    def _start_worker(self, interrupt):
        if self._worker is not None:
            raise RuntimeError("BUG: %s: worker started twice" % self.debug_label())
        handler = self._handler
        if handler is not None:
            handler.interrupt = interrupt
            handler.queues = self._sent_queues
        worker = _Worker("vhost-user-%s" % self.debug_label(), interrupt, handler,
                         self.client.fileno(), self._sent_queues, self._proxies)
        worker.start()
        self._worker = worker

    def _stop_worker(self):
        """Stop the worker; returns the error it failed with, if any."""
        worker, self._worker = self._worker, None
        error = None
        if worker is not None:
            error = worker.stop(self.timeout)
            if worker.handler_closed and self._handler is not None:
                self._handler.close()
                self._handler = None
        if self._handler is not None:
            self._handler.interrupt = None
            self._handler.queues = {}
        for event in self._proxies.values():
            event.close()
        self._proxies = {}
        return error

    def _stop_rings(self, reclaim):
        """Disable and stop every sent ring, then the worker; raise the first error."""
        queues, self._sent_queues = self._sent_queues, None
        error = None
        # The worker keeps serving back-end requests while GET_VRING_BASE
        # drains the rings, so it stops last (as in crosvm).
        for index, queue in sorted((queues or {}).items()):
            try:
                base = self._deactivate_vring(index, queue.packed)
                if reclaim:
                    queue.reclaim(base)
            except BaseException as exc:
                # Stop the other rings all the same (after a broken connection
                # their requests fail at once); the first error is raised.
                if error is None:
                    error = exc
        worker_error = self._stop_worker()
        if error is not None:
            raise error
        if worker_error is not None:
            raise worker_error
        return queues

    def _check_usable(self, what):
        if self.client is None:
            raise DeviceClosed("%s: the device was closed" % what)

    def reset(self) -> None:
        """Stop every ring and the worker, drop all SHMEM mappings; ``activate`` may follow.

        Raises:
            VhostUserError: the back-end failed; the device is reset anyway
                as far as this side goes, and the worker's own failure, if it
                had one, is raised here.
        """
        self._check_usable("reset")
        self._sleeping = None
        try:
            self._stop_rings(reclaim=False)
        finally:
            # The spec: a new inflight buffer after a device reset.
            self._close_inflight()
            # crosvm's TODO: the spec unmaps every SHMEM mapping on reset.
            if self._mapper is not None:
                self._mapper.clear()
            self._sent_features = None

    def virtio_sleep(self) -> Dict[int, Queue]:
        """Stop every ring and the worker; returns {index: Queue} with reclaimed state.

        Each queue's ``vring_base`` becomes GET_VRING_BASE's answer (see
        ``Queue.reclaim``); chains the back-end did not take stay posted for
        after ``virtio_wake``. Returns {} when the device was not active.
        """
        self._check_usable("virtio_sleep")
        if self._sent_queues is None:
            return {}
        mem, interrupt, queues = self._mem, self.interrupt, self._sent_queues
        self._stop_rings(reclaim=True)
        self._sleeping = (mem, interrupt, queues)
        return dict(queues)

    def virtio_wake(self, queues: Optional[Dict[int, Queue]] = None,
                    mem: Optional[GuestMemory] = None,
                    interrupt: Optional[Interrupt] = None) -> None:
        """Activate again after ``virtio_sleep``, with what it returned by default.

        The back-end resumes from the bases sent with SET_VRING_BASE (the
        queues' ``vring_base``). No-op when nothing sleeps and no queues are
        given.
        """
        self._check_usable("virtio_wake")
        if self._sleeping is None and queues is None:
            return
        saved_mem, saved_interrupt, saved_queues = self._sleeping or (None, None, None)
        self.activate(mem if mem is not None else saved_mem,
                      interrupt if interrupt is not None else saved_interrupt,
                      queues if queues is not None else saved_queues)

    # -- device state ---------------------------------------------------------

    def _check_state_transfer(self, what):
        self._check_usable(what)
        if not self.protocol_features & _P.DEVICE_STATE:
            raise FeatureNotNegotiated("%s needs protocol feature DEVICE_STATE, which was not "
                                       "negotiated" % what, FrontendReq.SET_DEVICE_STATE_FD)
        if self._sent_queues is not None:
            # Spec "Migrating back-end state": only while every ring is stopped.
            raise RuntimeError("%s: %s is active; call virtio_sleep() first"
                               % (what, self.debug_label()))

    def virtio_snapshot(self) -> DeviceState:
        """The stopped device's state: acked features and the back-end's bytes.

        SET_DEVICE_STATE_FD(SAVE, STOPPED) with a pipe (or the fd the back-end
        returns), read to EOF, CHECK_DEVICE_STATE.
        """
        self._check_state_transfer("virtio_snapshot")
        data = self._transfer_state(TRANSFER_SAVE, lambda fd: _read_until_eof(
            fd, self.timeout, "virtio_snapshot", self.max_state_size))
        return DeviceState(self._device_type, self.acked_features, data)

    def _transfer_state(self, direction, move):
        """SET_DEVICE_STATE_FD with a pipe, ``move(our_fd)``, then CHECK_DEVICE_STATE.

        Our end is replaced by the fd the back-end returns, if it returns one.
        EOF ends the state, so the back-end's end of the pipe is closed here
        before ``move`` runs, and our end after it.
        """
        read_fd, write_fd = _pipe()
        ours, theirs = (read_fd, write_fd) if direction == TRANSFER_SAVE else (write_fd, read_fd)
        try:
            returned = self.client.set_device_state_fd(direction, TRANSFER_PHASE_STOPPED,
                                                       theirs)
            os.close(theirs)
            theirs = -1
            if returned is not None:
                os.close(ours)
                ours = returned
            result = move(ours)
        finally:
            _close_fds([fd for fd in (ours, theirs) if fd >= 0])
        self.client.check_device_state()
        return result

    def virtio_restore(self, state: Union[DeviceState, bytes]) -> None:
        """Load a ``DeviceState`` (or its bytes) into the stopped back-end.

        Refuses a state of another device type or with features this back-end
        does not offer, sends SET_FEATURES when the acked set changes, then
        SET_DEVICE_STATE_FD(LOAD, STOPPED), the bytes, EOF, CHECK_DEVICE_STATE.
        A later ``virtio_wake``/``activate`` starts the rings.

        Raises:
            ValueError: another device type, or undecodable bytes.
            FeatureNotNegotiated: the state needs features the back-end lacks.
        """
        if not isinstance(state, DeviceState):
            state = DeviceState.from_bytes(state)
        self._check_state_transfer("virtio_restore")
        if int(state.device_type) != int(self._device_type):
            raise ValueError("virtio_restore: the state is of device type %r, this device "
                             "is %s" % (state.device_type, self._device_type.name))
        missing = state.acked_features & ~self._avail_features
        if missing:
            raise FeatureNotNegotiated(
                "virtio_restore: the state has features %#x (%s) this back-end does not offer"
                % (missing, ", ".join(VirtioFeature.names(missing, self._device_type))),
                FrontendReq.SET_FEATURES)
        self.acked_features = state.acked_features
        if self._sent_features != self.acked_features:
            self.ack_features(self.acked_features)
        self._transfer_state(TRANSFER_LOAD, lambda fd: _write_all(
            fd, state.backend_state, self.timeout, "virtio_restore"))

    # -- shared memory --------------------------------------------------------

    def get_shared_memory_region(self) -> Optional[SharedMemoryRegion]:
        """The device's shared memory region, or None (GET_SHMEM_CONFIG, asked once).

        Raises:
            ProtocolError: the back-end has more than one region (crosvm
                supports one).
        """
        self._check_usable("get_shared_memory_region")
        if not self.protocol_features & _P.SHMEM:
            return None
        if self._shmem_region is None:
            regions = self.client.get_shmem_config().regions()
            if len(regions) > 1:
                raise ProtocolError("GET_SHMEM_CONFIG: %d shared memory regions, only one is "
                                    "supported" % len(regions), FrontendReq.GET_SHMEM_CONFIG)
            self._shmem_region = SharedMemoryRegion(*regions[0]) if regions else False
        return self._shmem_region or None

    def set_shared_memory_mapper(self, mapper: _Mapper = None) -> _Mapper:
        """Serve SHMEM_MAP/UNMAP with ``mapper``; None installs the built-in one.

        A mapper has ``add_mapping(fd, fd_offset, shm_offset, length,
        writable)`` (``fd`` is closed after the call: dup it to keep it),
        ``remove_mapping(shm_offset, length)`` and ``clear()``, and raises
        ``OSError`` to refuse. The built-in mapper really maps the back-end's
        fds into a reserved range and offers ``read``/``write``/``mappings``
        (see ``shared_memory``). Returns the mapper in use.

        Raises:
            FeatureNotNegotiated: BACKEND_REQ or SHMEM was not negotiated.
            ValueError: the back-end has no shared memory region.
        """
        self._check_usable("set_shared_memory_mapper")
        if self._handler is None:
            raise FeatureNotNegotiated("set_shared_memory_mapper needs protocol feature "
                                       "BACKEND_REQ, which was not negotiated",
                                       FrontendReq.SET_BACKEND_REQ_FD)
        region = self.get_shared_memory_region()
        if region is None:
            raise ValueError("set_shared_memory_mapper: %s has no shared memory region"
                             % self.debug_label())
        own = None
        if mapper is None:
            mapper = own = _ShmemMapper(region)
        self._handler.set_shared_memory_mapper(mapper, region.id)
        if self._own_mapper is not None:
            self._own_mapper.close()
        self._mapper, self._own_mapper = mapper, own
        return mapper

    @property
    def shared_memory(self) -> _Mapper:
        """The mapper serving SHMEM_MAP/UNMAP, or None."""
        return self._mapper

    # -- reconnect ------------------------------------------------------------

    def reconnect(self, connection: _Connection) -> None:
        """Resume on a new connection after the back-end went away, with nothing lost.

        For a back-end that restarted (or one that hung up): the old
        connection, worker and back-end channel are dropped, then the whole
        handshake runs again on ``connection`` (a path, a socket or a
        ``BackendClient``), the acked features are sent again and, when the
        device was active, guest memory and every ring. Each queue is
        rewound first (``Queue.rewind``): the chains the old back-end had not
        completed are offered again, in the order they were posted, once.
        The ``Interrupt`` then reports the recovery (``signal_reconnected``).
        This driver's record of what is in flight is the source of truth.
        With INFLIGHT_SHMFD (split rings), the chains the inflight buffer says
        the old back-end had taken are resubmitted by the new back-end itself
        (it gets the buffer with SET_INFLIGHT_FD before the rings), so the
        avail ring offers only the others again: each chain runs once.

        On failure the device stays down and ``reconnect`` may be called
        again (e.g. when the back-end is not listening yet).

        Raises:
            BackendShrank: the new back-end offers fewer features, protocol
                features or queues than the device uses (the message names
                what is missing).
            Disconnected: it went away again.
            VhostUserError: any failure of the handshake.
        """
        self._check_usable("reconnect")
        self._end_dirty_log("the back-end is reconnected")
        queues = self._sent_queues
        interrupt = self.interrupt
        acked, sent = self.acked_features, self._sent_features
        old_protocol = self.protocol_features
        self._sent_queues = None
        error = self._stop_worker()
        if error is not None:
            _log.info("%s: the worker had failed: %s", self.debug_label(), error)
        if self._handler is not None:
            self._handler.close()
            self._handler = None
        self.client.close()
        try:
            self.client = self._connect(connection, self.timeout)
            self._negotiate(*self._negotiation)
            self._check_still_offered(acked, old_protocol, queues)
            self.acked_features = acked
            if sent is not None:
                self._sent_features = None
                self.ack_features(acked)
            if self.reconnect_check is not None:
                self.reconnect_check(self, "reconnect")()
            if self._mapper is not None:
                # The new back-end maps nothing yet: drop the old mappings.
                self._mapper.clear()
                if self._handler is not None and self.get_shared_memory_region() is not None:
                    self._handler.set_shared_memory_mapper(self._mapper,
                                                           self._shmem_region.id)
            resubmitted = []
            size = self._inflight.cut_short() if self._inflight is not None else None
            if size is not None:
                # The new back-end would map it past its end (SIGBUS there): a
                # new buffer is asked for, and the driver's record is used.
                _log.warning("%s: the inflight buffer was cut to %d bytes (mmap_offset %d + "
                             "mmap_size %d); a new one is asked for", self.debug_label(), size,
                             self._inflight.info.mmap_offset, self._inflight.info.mmap_size)
                self._close_inflight()
            if queues is not None:
                self._sent_queues = {}
                for index, queue in sorted(queues.items()):
                    queue.rewind(**self._inflight_rewind(index, resubmitted))
                self._send_rings(self._mem, interrupt, queues)
        except BaseException:
            # Down again: what was active stays recorded for the next attempt.
            self._sent_queues = None
            try:
                self._stop_worker()
            except VhostUserTimeout:
                pass
            self._sent_queues = queues
            self.acked_features = acked
            self._sent_features = sent
            if self._handler is not None:
                self._handler.close()
                self._handler = None
            self.client.close()
            raise
        in_flight = sum(queue.in_flight for queue in (queues or {}).values())
        _log.info("%s: reconnected; %d chain(s) in flight offered again%s", self.debug_label(),
                  in_flight, ", %d of them resubmitted by the back-end from its inflight buffer"
                  % len(resubmitted) if self._inflight is not None else "")
        if interrupt is not None:
            interrupt.signal_reconnected()

    def _inflight_rewind(self, index, resubmitted):
        """``Queue.rewind`` arguments for queue ``index``; heads left to the back-end
        are appended to ``resubmitted``."""
        region = self._inflight
        if region is None or index >= region.num_queues \
                or self.acked_features & VirtioFeature.RING_PACKED:
            return {}

        def taken(used_idx, waiting):
            heads = region.taken(index, used_idx, waiting, self.debug_label())
            resubmitted.extend(heads)
            return heads
        return {"resubmitted": taken}

    def _check_still_offered(self, acked, old_protocol, queues, what="reconnect"):
        """Disconnected (naming what is missing) if the new back-end offers less."""
        missing = acked & ~self._avail_features
        if missing:
            raise BackendShrank(
                "%s: the back-end no longer offers acked feature(s) %s (%#x)"
                % (what, " ".join(VirtioFeature.names(missing, self._device_type)), missing),
                FrontendReq.GET_FEATURES)
        missing = old_protocol & ~self.protocol_features
        if missing:
            raise BackendShrank(
                "%s: the back-end no longer offers protocol feature(s) %s (%#x)"
                % (what, " ".join(ProtocolFeature.names(missing)), int(missing)),
                FrontendReq.GET_PROTOCOL_FEATURES)
        for index, queue in sorted((queues or {}).items()):
            if index >= len(self._queue_sizes) or queue.size > self._queue_sizes[index]:
                raise BackendShrank(
                    "%s: the back-end now has %d queue(s) of up to %d entries; queue "
                    "%d of size %d is in use" % (what, len(self._queue_sizes),
                                                 max(self._queue_sizes), index, queue.size),
                    FrontendReq.GET_QUEUE_NUM)

    # -- dirty log ------------------------------------------------------------

    def start_dirty_log(self) -> DirtyLog:
        """Have the back-end log every guest page it writes; returns the ``DirtyLog``.

        What QEMU's vhost_migration_log does: SET_LOG_BASE with a memfd of one
        bit per 4 KiB page of guest memory (LOG_SHMFD; the reply may be empty,
        as DPDK sends it, or echo mmap_size, as libvhost-user does), then
        SET_FEATURES again with VHOST_F_LOG_ALL, then SET_VRING_ADDR with
        VHOST_VRING_F_LOG and the log address for every started ring (rings
        started later get them too). While the log is on, the same
        ``DirtyLog`` is returned: SET_LOG_BASE is never sent twice for one log
        (DPDK crashed on a repeated one). ``reconnect`` and ``move_to`` end
        logging (the new back-end has no log).

        Raises:
            FeatureNotNegotiated: the back-end does not offer VHOST_F_LOG_ALL,
                or LOG_SHMFD was not negotiated (pass it in
                ``protocol_features``); nothing was sent.
            ValueError: the device is not active (no guest memory yet).
        """
        self._check_usable("start_dirty_log")
        if self._dirty_log is not None:
            return self._dirty_log
        missing = []
        if not (self.client.features or 0) & VirtioFeature.LOG_ALL:
            missing.append("the back-end does not offer VHOST_F_LOG_ALL (bit 26)")
        if not self.protocol_features & _P.LOG_SHMFD:
            missing.append("protocol feature LOG_SHMFD (bit 1) was not negotiated (negotiated "
                           "%#x)" % int(self.protocol_features))
        if missing:
            raise FeatureNotNegotiated("SET_LOG_BASE: %s" % "; ".join(missing),
                                       FrontendReq.SET_LOG_BASE)
        if self._mem is None or self._sent_queues is None:
            raise ValueError("start_dirty_log: %s is not active; activate it first"
                             % self.debug_label())
        for index, queue in sorted(self._sent_queues.items()):
            if queue.packed and not queue.desc_table:
                # DPDK 22.11 takes log_guest_addr 0 for a failed translation and
                # stops serving the ring without a word (seen with testpmd).
                raise ValueError("start_dirty_log: packed ring %d's descriptor ring, its log "
                                 "address, is at guest address 0, which DPDK takes for no "
                                 "log and then stops the ring; place guest memory (or the "
                                 "ring) above 0" % index)
        end = max(r.guest_phys_addr + r.memory_size for r, _ in self._mem.regions())
        log = DirtyLog(self, -(-end // _LOG_PAGE))
        try:
            self.client.set_log_base(log.mmap_size, 0, log.fileno())
            self._dirty_log = log
            log.active = True
            self._log_rings()
        except BaseException:
            self._dirty_log = None
            log.active = False
            log._free()
            raise
        _log.info("%s: dirty logging on, %d pages in a %d-byte log", self.debug_label(),
                  log.page_count, log.mmap_size)
        return log

    def _log_rings(self):
        """SET_FEATURES with LOG_ALL while logging (without it after), then SET_VRING_ADDR
        of every started ring (QEMU's vhost_dev_set_log)."""
        self.ack_features(self.acked_features)
        for index, queue in sorted((self._sent_queues or {}).items()):
            self._send_vring_addr(self._mem, index, queue)

    def _end_dirty_log(self, why):
        """Forget the log without telling the back-end (it is being left)."""
        log, self._dirty_log = self._dirty_log, None
        if log is not None:
            log.active = False
            _log.warning("%s: dirty logging ended: %s", self.debug_label(), why)

    # -- moving to another back-end ---------------------------------------------

    def move_to(self, connection: _Connection, drain_timeout: Optional[float] = None) -> None:
        """Move the running device to another back-end (a migration's two halves, no VM).

        1. Connect and negotiate with the new back-end while the old one runs;
           it must offer every acked feature, protocol feature and queue, and
           pass ``reconnect_check`` (BlockDevice: no smaller disk).
        2. Stop every ring on the old back-end (SET_VRING_ENABLE 0,
           GET_VRING_BASE); each queue takes the base it returns. A back-end
           that completes requests after GET_VRING_BASE (qemu-storage-daemon
           finishes the I/O it started) is waited for up to
           ``drain_timeout`` (default ``timeout``), split rings: used->idx
           must reach the base, so that it never writes guest memory again.
        3. Start the new back-end with the same guest memory and interrupt:
           the acked features, then every ring from those indices, what was
           in flight and not completed offered again (``Queue.rewind``, as
           ``reconnect`` does).
        4. Close the old connection (its rings are stopped: a graceful hang-up).

        A failure in 1 changes nothing. A failure in 3 starts the rings
        again on the old back-end (when it is alive) and raises; the device
        stays there. Dirty logging ends (the new back-end has no log).

        Raises:
            BackendShrank: the new back-end offers less than the device uses
                (the message names what, a BlockDevice's smaller disk too).
            Disconnected: it went away.
            VhostUserTimeout: the old back-end did not complete what it had
                taken within ``drain_timeout``; the device stays on it.
            VhostUserError: another failure of the new back-end.
        """
        self._check_usable("move_to")
        if self._mapper is not None:
            raise ValueError("move_to: not with a shared memory mapper (SHMEM mappings "
                             "belong to the old back-end)")
        acked, sent = self.acked_features, self._sent_features
        queues, interrupt, mem = self._sent_queues, self.interrupt, self._mem
        old = self._backend_side()
        new_client = self._connect(connection, self.timeout)
        self.client, self._handler, self._inflight = new_client, None, None
        record = None
        try:
            self._negotiate(*self._negotiation)
            self._check_still_offered(acked, old[2], queues, "move_to")
            if self.reconnect_check is not None:
                record = self.reconnect_check(self, "move_to")
        except BaseException:
            self._drop_backend_side()
            self._restore_backend_side(old, acked, sent)
            raise
        new = self._backend_side()
        self._restore_backend_side(old, acked, sent)
        self._end_dirty_log("the device moves to another back-end")
        if queues is not None:
            self._stop_old_rings(queues, mem, interrupt, drain_timeout, new)
        self._restore_backend_side(new, acked, None)
        try:
            self.ack_features(acked)
            in_flight = 0
            if queues is not None:
                self._sent_queues = {}
                for index, queue in sorted(queues.items()):
                    queue.rewind()
                    # Split: the chains from the new base (used->idx) to avail->idx.
                    in_flight += queue.in_flight if queue.packed else \
                        (queue.next_avail - queue.vring_base) & 0xFFFF
                self._send_rings(mem, interrupt, queues)
        except BaseException as exc:
            self._move_back(old, acked, sent, queues, mem, interrupt, exc)
            raise
        # The old back-end's rings are stopped: this hang-up is a graceful one.
        self._drop_backend_side(old)
        if record is not None:
            record()
        self.moves += 1
        self.moved_in_flight = in_flight
        _log.info("%s: moved to another back-end; %d chain(s) the old one had not completed "
                  "offered again", self.debug_label(), in_flight)
        if interrupt is not None and interrupt.crash_error is not None:
            interrupt.signal_reconnected()

    def _backend_side(self):
        """What negotiating with one back-end sets (``move_to`` keeps two of them)."""
        return (self.client, self._handler, self.protocol_features, self._avail_features,
                self._queue_sizes, self._inflight)

    def _restore_backend_side(self, side, acked, sent):
        (self.client, self._handler, self.protocol_features, self._avail_features,
         self._queue_sizes, self._inflight) = side
        self.acked_features, self._sent_features = acked, sent

    def _drop_backend_side(self, side=None):
        """Close a back-end's handler, inflight buffer and connection (default: the current)."""
        if side is None:
            side = self._backend_side()
        client, handler, inflight = side[0], side[1], side[5]
        for thing in (handler, inflight, client):
            if thing is not None:
                thing.close()

    def _stop_old_rings(self, queues, mem, interrupt, drain_timeout, new):
        """``move_to`` step 2; on a drain timeout the old rings run again and it raises."""
        try:
            self._stop_rings(reclaim=True)
        except VhostUserError as exc:
            # The old back-end failed or went away: moving away is what is left.
            _log.warning("%s: stopping the old back-end's rings: %s; moving on",
                         self.debug_label(), exc)
            return
        drain = self.timeout if drain_timeout is None else drain_timeout
        deadline = time.monotonic() + drain
        for index, queue in sorted(queues.items()):
            if queue.packed:
                continue   # its used position is in the base; DPDK uses chains inline
            while queue.used_index() != queue.vring_base:
                if time.monotonic() >= deadline:
                    late = (queue.vring_base - queue.used_index()) & 0xFFFF
                    self._drop_backend_side(new)
                    self._sent_queues = {}
                    self._send_rings(mem, interrupt, queues)
                    raise VhostUserTimeout(
                        "move_to: queue %d: the old back-end took %d chain(s) it did not "
                        "complete within %.1f s of GET_VRING_BASE; the device stays on it"
                        % (index, late, drain), FrontendReq.GET_VRING_BASE)
                time.sleep(0.001)

    def _move_back(self, old, acked, sent, queues, mem, interrupt, exc):
        """``move_to`` step 3 failed: stop the new back-end, run the old one again."""
        try:
            self._stop_rings(reclaim=False)
        except VhostUserError:
            pass
        self._drop_backend_side()
        self._restore_backend_side(old, acked, sent)
        if queues is None:
            return
        if old[0].broken is not None:
            # Down on both sides: reported as an outage, the rings recorded for
            # reconnect (``reconnect=`` then waits for the old back-end).
            self._sent_queues = queues
            if interrupt is not None:
                interrupt.signal_crashed(exc)
            return
        try:
            # The new back-end may have completed chains before it failed:
            # rewinding again offers the old one exactly those it has not.
            for index, queue in sorted(queues.items()):
                queue.rewind()
            self._sent_queues = {}
            self._send_rings(mem, interrupt, queues)
        except VhostUserError as again:
            self._sent_queues = queues
            _log.warning("%s: move_to failed (%s) and the old back-end did not restart: %s",
                         self.debug_label(), exc, again)
            if interrupt is not None:
                interrupt.signal_crashed(again)
        else:
            _log.warning("%s: move_to failed, the device stays on the old back-end: %s",
                         self.debug_label(), exc)

    # -- teardown -------------------------------------------------------------

    #: Seconds ``close`` waits for each reply while it stops the rings.
    close_timeout = 1.0

    def close(self) -> None:
        """Stop the rings and the worker, then close the connection; safe to call twice.

        Each started ring is stopped first, as QEMU's vhost_dev_stop does:
        SET_VRING_ENABLE(0) and GET_VRING_BASE, each reply awaited at most
        ``close_timeout`` seconds, so a back-end never sees the hang-up with
        rings still running (qemu-storage-daemon 7.2 can abort then). Not
        after a crash or a broken connection. Guest memory and queues belong
        to the caller: the back-end has stopped using them once this returns
        (or the bound passed). A worker failure is logged, not raised.
        """
        try:
            if self._sent_queues is not None and self.client is not None:
                self._stop_rings_before_hang_up()
            if self._worker is not None:
                try:
                    error = self._stop_worker()
                except VhostUserTimeout as exc:
                    error = exc
                if error is not None:
                    _log.warning("%s: worker had failed: %s", self.debug_label(), error)
        finally:
            self._sent_queues = None
            self._sleeping = None
            for event in self._proxies.values():
                event.close()
            self._proxies = {}
            if self._handler is not None:
                self._handler.close()
                self._handler = None
            if self._own_mapper is not None:
                self._own_mapper.close()
            self._mapper = self._own_mapper = None
            self._close_inflight()
            log, self._dirty_log = self._dirty_log, None
            if log is not None:
                log.stop()   # frees it; the back-end is hanging up anyway
            if self._own_interrupt is not None:
                self._own_interrupt.close()
                self._own_interrupt = None
            if self.client is not None:
                self.client.close()
                self.client = None

    def _stop_rings_before_hang_up(self):
        queues, self._sent_queues = self._sent_queues, None
        client = self.client
        crashed = self.interrupt is not None and self.interrupt.crash_error is not None
        if crashed or client.broken is not None:
            return
        saved = client.timeout
        client.timeout = min(saved, self.close_timeout)
        try:
            for index in sorted(queues):
                try:
                    self._deactivate_vring(index)
                except VhostUserError as exc:
                    _log.info("%s: stopping ring %d before closing: %s", self.debug_label(),
                              index, exc)
                    if client.broken is not None:
                        break
        finally:
            if client.broken is None:
                client.timeout = saved

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self.client is None:
            state = "closed"
        elif self._sent_queues is not None:
            state = "active, %d queue(s)" % len(self._sent_queues)
        else:
            state = "sleeping" if self._sleeping else "inactive"
        return "<VhostUserFrontend %s %s>" % (self.debug_label(), state)


def _read_until_eof(fd, timeout, what, limit):
    """Everything readable from ``fd`` until EOF; ``timeout`` bounds each wait.

    More than ``limit`` bytes raises ``ProtocolError``: the fd is the
    back-end's choice, and one that never ends must not exhaust our memory.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks = []
    total = 0
    while True:
        if not poller.poll(timeout * 1000.0):
            raise VhostUserTimeout("%s: the back-end sent no state data and no EOF for %.1f s "
                                   "(after %d bytes)" % (what, timeout, sum(map(len, chunks))))
        try:
            data = os.read(fd, 1 << 20)
        except OSError as exc:  # e.g. the back-end returned an fd not open for reading
            raise ProtocolError("%s: cannot read the state from the back-end's fd: %s"
                                % (what, exc.strerror), FrontendReq.SET_DEVICE_STATE_FD) \
                from exc
        if not data:
            return b"".join(chunks)
        chunks.append(data)
        total += len(data)
        if total > limit:
            raise ProtocolError("%s: the back-end streamed more than max_state_size (%d bytes) "
                                "of state" % (what, limit), FrontendReq.SET_DEVICE_STATE_FD)


def _write_all(fd, data, timeout, what):
    """Write ``data`` to a pipe; ``timeout`` bounds each wait for room."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    view = memoryview(data)
    done = 0
    while done < len(view):
        if not poller.poll(timeout * 1000.0):
            raise VhostUserTimeout("%s: the back-end read no state data for %.1f s (%d of %d "
                                   "bytes sent)" % (what, timeout, done, len(view)))
        try:
            # One PIPE_BUF at a time: a write that size fits once poll says POLLOUT.
            done += os.write(fd, view[done:done + select.PIPE_BUF])
        except BrokenPipeError as exc:
            raise BackendError("%s: the back-end closed the state pipe after %d of %d bytes"
                               % (what, done, len(view)), FrontendReq.SET_DEVICE_STATE_FD) \
                from exc
        except OSError as exc:  # e.g. the back-end returned an fd not open for writing
            raise ProtocolError("%s: cannot write the state to the back-end's fd: %s"
                                % (what, exc.strerror), FrontendReq.SET_DEVICE_STATE_FD) \
                from exc


############################################################################
# Device plumbing ##########################################################
############################################################################

#: Longest sleep on a call eventfd before checking whether the back-end hung up.
_CRASH_CHECK_INTERVAL = 0.1
#: Pause between two attempts to reach a restarted back-end.
_RECONNECT_RETRY = 0.02
#: Longest wait for the socket in one attempt (close() is checked between them).
_RECONNECT_ATTEMPT = 0.25

# Device bits (0-23) that only virtio-net defines among the types named here
# (MTU, GUEST_TSO6, CTRL_RX .. CTRL_MAC_ADDR), and its high bits 50-63.
_NET_ONLY_BITS = (1 << 3) | (1 << 8) | (0x3F << 18) | 0xFFFC_0000_0000_0000
# Bits 5-17 exist only for net and block; the other types stop below bit 5.
_NET_OR_BLK_BITS = 0x3FFE0


def _guess_device_type(features, protocol_features):
    """(DeviceType or None, why, conclusive) from what a back-end offers.

    vhost-user never names the device type, so this reads the offered bits:
    net-only feature bits mean net; block bits with CONFIG mean block (QEMU's
    vhost-user-blk refuses a back-end without CONFIG, vhost-user-net never
    reads config); no device bits and no CONFIG looks like virtio-fs (whose
    config QEMU supplies), which is only a hint.
    """
    device_bits = features & _DEVICE_SPECIFIC_FEATURES
    has_config = bool((protocol_features or 0) & ProtocolFeature.CONFIG)
    if device_bits & _NET_ONLY_BITS:
        names = VirtioFeature.names(device_bits & _NET_ONLY_BITS, DeviceType.NET)
        return DeviceType.NET, "offers %s" % " ".join(names[:3]), True
    if device_bits & _NET_OR_BLK_BITS:
        if has_config:
            return DeviceType.BLOCK, "offers block feature bits and CONFIG", True
        return DeviceType.NET, "offers net feature bits and no CONFIG", True
    if not device_bits and not has_config and protocol_features is not None:
        return DeviceType.FS, "no device feature bits and no CONFIG", False
    return None, "nothing conclusive", False


# GEOMETRY and BLK_SIZE: bits no virtio-net device offers (net bits 4 and 6
# are unused since virtio 1.0), unlike the other block bits, which net shares.
_BLK_HINT_BITS = (1 << 4) | (1 << 6)


def _refuse_other_device_type(frontend, wanted):
    """FeatureNotNegotiated saying "wrong device type" when the back-end is conclusively another.

    A net device may offer CONFIG and bits that block also defines (MAC is
    block's RO), so for ``NET`` a block guess must also show a block-only bit.
    """
    protocol = frontend.protocol_features if frontend.acked_features else None
    offered = frontend.features()
    guess, why, conclusive = _guess_device_type(offered, protocol)
    if guess == DeviceType.BLOCK and wanted == DeviceType.NET and not offered & _BLK_HINT_BITS:
        conclusive = False
    if conclusive and guess != wanted:
        raise FeatureNotNegotiated("virtio-%s: wrong device type: the back-end is a %s device "
                                   "(it %s)" % (_DEVICE_LABELS[wanted], guess.name.lower(), why))


_DEVICE_LABELS = {DeviceType.BLOCK: "blk", DeviceType.NET: "net", DeviceType.FS: "fs"}


#: Packed ring positions have 15 bits (spec 2.8: "Queue Size ... up to 2^15").
_PACKED_MAX_SIZE = 1 << 15


def _packed_offer(packed):
    """RING_PACKED for the front-end a device's ``connect`` builds, unless ``packed=False``."""
    return 0 if packed is False else VirtioFeature.RING_PACKED


def _use_packed(offered, packed, size, what):
    """Whether a device runs packed rings: ``packed`` None, True or False, and the offer.

    None: when offered and the ring size allows; True: required, or
    ``FeatureNotNegotiated`` before anything is set up; False: never.
    """
    if packed not in (None, True, False):
        raise ValueError("%s: packed must be None, True or False, not %r" % (what, packed))
    available = bool(offered & VirtioFeature.RING_PACKED)
    if packed and not available:
        raise FeatureNotNegotiated("%s: packed=True, but RING_PACKED is not offered (the "
                                   "back-end lacks it, or the front-end was built without "
                                   "packed=True)" % what, FrontendReq.SET_FEATURES)
    if packed and size > _PACKED_MAX_SIZE:
        raise ValueError("%s: packed rings hold at most %d entries, not %d"
                         % (what, _PACKED_MAX_SIZE, size))
    return available and packed is not False and size <= _PACKED_MAX_SIZE


class _DeviceCall:
    """One call into a device's rings (see ``_Device._call``)."""

    __slots__ = ("device", "what")

    def __init__(self, device, what):
        self.device = device
        self.what = what

    def __enter__(self):
        device = self.device
        # Counted before the check: close() sets _closing, then waits for
        # the count to drop (list appends and pops are atomic).
        device._inside.append(None)
        if device._closing:
            device._inside.pop()
            raise DeviceClosed("%s: the device was closed" % self.what)
        return self

    def __exit__(self, kind, exc, traceback):
        device = self.device
        device._inside.pop()
        if kind is not None:
            device._closed_error(self.what, exc)
        return False


class _Device:
    """What the device drivers share: the front-end, guest memory and queues they own.

    Also the liveness every call checks (``_check_alive``): a closed device
    raises ``DeviceClosed``; a back-end that went away raises
    ``Disconnected``, or with ``reconnect=`` is waited for and reconnected
    (``_recover``), the caller's timeout extended by the outage.
    """

    timeout: float        # seconds a call waits; each device sets it
    _frontend = None  # type: Optional[VhostUserFrontend]
    _mem = None  # type: Optional[GuestMemory]
    _queues = ()  # type: Sequence[Queue]
    _closing = False
    _open_completions = {}   # queue index -> _Completions while open (BlockDevice)
    _inside = ()  # type: Any  # a list once open: one entry per thread in a call (see _call)
    _reconnect = None     # seconds to wait for the back-end to come back, or None
    _dead = None  # type: Optional[VhostUserError]  # why the device cannot recover
    _recover_lock = None  # type: Optional[threading.Lock]
    _moving = False       # move_to is switching back-ends (holding _recover_lock)
    _movable = True

    @property
    def interrupt(self) -> Optional[Interrupt]:
        """The ``Interrupt`` reporting outages and recoveries (``crash_error``, ``reconnects``)."""
        return self._frontend.interrupt if self._frontend is not None else None

    def _init_reconnect(self, reconnect):
        if reconnect is None:
            return
        if isinstance(reconnect, bool) or not isinstance(reconnect, (int, float)) \
                or not 0 < reconnect < float("inf"):
            raise ValueError("reconnect must be a positive number of seconds, not %r"
                             % (reconnect,))
        if self._frontend.client.path is None:
            raise ValueError("reconnect= needs the socket path (the device was given a "
                             "socket or a client without one)")
        self._reconnect = float(reconnect)
        self._recover_lock = threading.Lock()

    def _check_alive(self, what):
        """0.0 when the back-end is up; else the seconds spent until it was back.

        Raises:
            DeviceClosed: the device was closed (before or during the call).
            Disconnected: the back-end is gone (and did not come back).
        """
        if self._closing or self._frontend is None:
            raise DeviceClosed("%s: the device was closed" % what)
        if self._dead is not None:
            raise Disconnected("%s: %s" % (what, self._dead)) from self._dead
        if self._moving:
            return self._wait_for_move(what)
        interrupt = self._frontend.interrupt
        error = interrupt.crash_error if interrupt is not None else None
        if error is None:
            return 0.0
        if self._reconnect is None:
            raise Disconnected("%s: the back-end is gone: %s" % (what, error)) from error
        return self._recover(what)

    def _trouble(self):
        """True when ``_check_alive`` has something to say (cheap, for wait loops)."""
        frontend = self._frontend
        return (self._closing or frontend is None or self._dead is not None or self._moving
                or frontend.interrupt is not None and frontend.interrupt.crash_error is not None)

    def _recover(self, what):
        """Reconnect (one thread does, the others wait for it); returns the seconds it took."""
        started = time.monotonic()
        if not self._recover_lock.acquire(timeout=self._reconnect + 4 * self.timeout + 1):
            raise VhostUserTimeout("%s: another thread's reconnect did not finish" % what)
        try:
            frontend = self._frontend
            if self._closing or frontend is None:
                raise DeviceClosed("%s: the device was closed" % what)
            if self._dead is None and frontend.interrupt.crash_error is not None:
                self._reconnect_backend(frontend)
            if self._closing:
                raise DeviceClosed("%s: the device was closed" % what)
            if self._dead is not None:
                raise Disconnected("%s: %s" % (what, self._dead)) from self._dead
        finally:
            self._recover_lock.release()
        return time.monotonic() - started

    def _reconnect_backend(self, frontend):
        """Wait up to ``reconnect`` seconds for the back-end and reconnect; else mark dead."""
        client = frontend.client
        path, listening = client.path, client.listening
        error = frontend.interrupt.crash_error
        started = time.monotonic()
        deadline = started + self._reconnect
        _log.info("%s: the back-end went away (%s); waiting up to %.1f s for it at %s",
                  frontend.debug_label(), error, self._reconnect, path)
        attempts = 0
        while True:
            attempts += 1
            # Short attempts, so that a close() on another thread is noticed soon.
            attempt = min(max(0.01, deadline - time.monotonic()), _RECONNECT_ATTEMPT)
            try:
                if listening:
                    connection = BackendClient.listen(path, timeout=attempt,
                                                      reply_timeout=frontend.timeout)
                else:
                    connection = BackendClient.connect(path, timeout=attempt,
                                                       reply_timeout=frontend.timeout)
                frontend.reconnect(connection)
                break
            except BackendShrank as exc:
                self._dead = exc
                break
            except VhostUserError as exc:
                error = exc
            if self._closing:
                return   # _recover says the device was closed
            if time.monotonic() >= deadline:
                self._dead = Disconnected("the back-end did not come back within %g s "
                                          "(%d attempt(s)): %s" % (self._reconnect, attempts,
                                                                   error))
                break
            time.sleep(_RECONNECT_RETRY)
        if self._dead is not None:
            _log.warning("%s: giving up: %s", frontend.debug_label(), self._dead)
        else:
            _log.info("%s: back at %s after %.3f s (%d attempt(s))", frontend.debug_label(),
                      path, time.monotonic() - started, attempts)

    @staticmethod
    def _connect_device(device_type, features, path, timeout, reconnect, make, packed=None):
        """``make(VhostUserFrontend(...))``; with ``reconnect`` and a path, retried
        for up to ``reconnect`` seconds when the back-end goes away during it.
        RING_PACKED is offered to ``make`` unless ``packed`` is False."""
        features |= _packed_offer(packed)
        packed = packed is not False
        # QEMU asks for INFLIGHT_SHMFD for vhost-user-blk only; a net device
        # sends TX frames again and posts RX buffers afresh anyway.
        # LOG_SHMFD: start_dirty_log needs it, and it changes nothing else.
        protocol = _CROSVM_PROTOCOL_FEATURES | _P.LOG_SHMFD
        if device_type == DeviceType.BLOCK:
            protocol |= _P.INFLIGHT_SHMFD
        if reconnect is None or not isinstance(path, (str, bytes, os.PathLike)):
            return make(VhostUserFrontend(device_type, features, path, timeout=timeout,
                                          packed=packed, protocol_features=protocol))
        deadline = time.monotonic() + reconnect if isinstance(reconnect, (int, float)) \
            else None  # a bad value is refused by the constructor
        _check_socket_path(os.fspath(path))   # a regular file will not turn into a socket
        while True:
            try:
                return make(VhostUserFrontend(device_type, features, path, timeout=timeout,
                                              packed=packed, protocol_features=protocol))
            except (Disconnected, VhostUserTimeout, ProtocolError) as exc:
                if isinstance(exc, BackendShrank) or deadline is None \
                        or time.monotonic() >= deadline:
                    raise
                _log.info("%s: the back-end went away while connecting (%s); retrying",
                          path, exc)
            time.sleep(_RECONNECT_RETRY)

    def start_dirty_log(self) -> DirtyLog:
        """Have the back-end log the guest pages it writes; returns the ``DirtyLog``.

        See ``VhostUserFrontend.start_dirty_log``. Page n of the log is guest
        physical address n * 4096 of the device's guest memory (``memory``).
        """
        with self._call("start_dirty_log"):
            self._check_alive("start_dirty_log")
            return self._frontend.start_dirty_log()

    @property
    def memory(self) -> Optional[GuestMemory]:
        """The device's ``GuestMemory`` (rings and buffers)."""
        return self._mem

    def move_to(self, path: _Connection, drain_timeout: Optional[float] = None) -> None:
        """Move the running device to the back-end at ``path``, with nothing lost.

        Stops every ring on the old back-end, starts the new one with the same
        guest memory and the ring indices the old one returned, offers again
        what was in flight and not completed, and closes the old connection
        gracefully (``VhostUserFrontend.move_to``). Calls in other threads
        wait for the switch and then continue. On failure the device stays on
        the old back-end when that one is alive, and the error says why.

        Raises:
            BackendShrank: the new back-end offers less than the device uses
                (another device type, fewer features or queues, a smaller
                disk).
            Disconnected: it went away.
            VhostUserError: any other failure of the new back-end (or a
                timeout waiting for the old one to complete its requests).
        """
        if not self._movable:
            raise ValueError("move_to: a %s cannot move: its session state lives in the "
                             "back-end" % type(self).__name__)
        with self._call("move_to"):
            # Not _check_alive: a device whose back-end died may move to another one.
            if self._closing or self._frontend is None:
                raise DeviceClosed("move_to: the device was closed")
            if self._recover_lock is None:
                self._recover_lock = threading.Lock()
            if not self._recover_lock.acquire(timeout=4 * self.timeout + 1):
                raise VhostUserTimeout("move_to: another thread's move or reconnect did not "
                                       "finish")
            try:
                self._moving = True
                try:
                    self._frontend.move_to(path, drain_timeout)
                    self._dead = None   # a device that could not reconnect lives again
                finally:
                    self._moving = False
            finally:
                self._recover_lock.release()

    def _wait_for_move(self, what):
        """Block until ``move_to`` (another thread) is done; returns the seconds waited."""
        started = time.monotonic()
        lock = self._recover_lock
        if lock is not None and lock.acquire(timeout=4 * self.timeout + 1):
            lock.release()
        elif self._moving:
            raise VhostUserTimeout("%s: a move to another back-end did not finish" % what)
        if self._closing or self._frontend is None:
            raise DeviceClosed("%s: the device was closed" % what)
        return time.monotonic() - started

    def _call(self, what):
        """A context manager around every use of the rings: refuses a closed device, and
        lets ``close`` wait until no thread is inside before it frees queues and memory
        (an eventfd closed under a thread could be reused as another fd by then).
        The fast path spells the same out inline (see ``BlockDevice.reap``)."""
        return _DeviceCall(self, what)

    def _closed_error(self, what, exc):
        """Raise ``DeviceClosed`` for the ValueError/OSError of a queue closed under a call."""
        if self._closing and isinstance(exc, (ValueError, OSError)) \
                and not isinstance(exc, VhostUserError):
            raise DeviceClosed("%s: the device was closed" % what) from exc

    def _release_buffers(self):
        """What a device frees after the rings stopped and before guest memory goes."""

    def _wake_waiters(self):
        """Wake every thread waiting on a queue (close() on another thread)."""
        for queue in self._queues:
            if queue.call is not None:
                try:
                    queue.wake_waiter()
                except ValueError:
                    pass

    @property
    def frontend(self) -> Optional[VhostUserFrontend]:
        """The ``VhostUserFrontend`` it drives (for ``virtio_sleep``/``virtio_wake``)."""
        return self._frontend

    def close(self) -> None:
        """Stop the rings, disconnect and free guest memory; safe to call twice.

        Calls waiting in other threads wake at once and raise a
        ``VhostUserError`` (also a ``ValueError``) saying the device was
        closed; so do requests still in flight. The back-end's rings are
        stopped (``VhostUserFrontend.close``) before guest memory is freed.
        """
        self._closing = True
        self._open_completions = {}
        self._wake_waiters()
        # The waiters wake (wake_waiter), see _closing and leave.
        deadline = time.monotonic() + self.timeout + 1
        while self._inside and time.monotonic() < deadline:
            self._wake_waiters()
            time.sleep(0.001)
        locked = self._recover_lock is not None and self._recover_lock.acquire(
            timeout=2 * self.timeout + 1)
        try:
            frontend, self._frontend = self._frontend, None
            if frontend is not None:
                frontend.close()
            self._release_buffers()
            for queue in self._queues:
                queue.close()
            self._queues = ()
            mem, self._mem = self._mem, None
            if mem is not None:
                mem.close()
        finally:
            if locked:
                self._recover_lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Placement(NamedTuple):
    """Where the two sides run, and the completion policy chosen from it."""
    backend_pid: object     # int, or None when SO_PEERCRED could not tell
    shared_cpu: bool        # both are pinned to the same single CPU
    spin: float             # seconds wait_used polls before sleeping (at first)
    event_idx: bool         # negotiate RING_EVENT_IDX
    defer_calls: bool       # ask for a call only when about to sleep
    spin_max: float = 0.0   # above 0: the spin adapts to the back-end, up to this


def _placement(client, spin=None, event_idx=None):
    """The notification and spin policy for a device whose back-end is at ``client``'s end.

    Measured with qemu-storage-daemon (BACKENDS.md): with both sides on one
    CPU, a spin only takes the CPU the back-end needs. On two CPUs, polling
    for as long as the back-end usually takes spares two cross-CPU
    wake-ups per round trip (ours and, when it ran dry, the back-end's), so
    the spin adapts (``Queue.spin_max``). Either way EVENT_IDX with calls
    asked for only when the driver is about to sleep beats a call per
    completion: the back-end skips an eventfd write per completion while
    we poll. ``spin`` (fixed) and ``event_idx`` override the choice.
    """
    pid = None
    shared = False
    peer_pid = getattr(client, "peer_pid", None)
    if peer_pid is not None:
        pid = peer_pid()
    if pid is not None:
        ours, theirs = _cpu_affinity(0), _cpu_affinity(pid)
        shared = ours is not None and theirs is not None and len(ours | theirs) == 1
    spin_max = 0.0
    if spin is None:
        spin, spin_max = (0.0, 0.0) if shared else (_DEFAULT_SPIN, _SPIN_MAX)
    if spin < 0:
        raise ValueError("spin must be >= 0 seconds, got %r" % (spin,))
    if event_idx is None:
        event_idx = True
    return _Placement(pid, shared, float(spin), bool(event_idx), bool(event_idx), spin_max)


class _Completions:
    """Routes one queue's used entries to the threads waiting for them.

    One thread at a time reaps (waits on the call eventfd); the others wait
    on a condition variable and are woken after each reap, so no thread
    sleeps on an eventfd signal another thread already consumed.
    """

    def __init__(self, queue, device):
        self.queue = queue
        self.device = device
        # The lock itself for plain critical sections: entering it costs no
        # Python-level call, unlike the condition. It is the queue's lock
        # (built re-entrant, as queue methods take it again under it): the
        # fast path holds one lock once per post and once per reap.
        self.lock = queue.lock
        self.cond = threading.Condition(self.lock)
        self.reaping = False
        self.finished = []    # background requests done but not yet returned
        self.slots = None     # the queue's _BlockSlots once the fast path is used
        self.cells = []       # free (view, offset, guest address): header + status in guest memory
        self.cell_views = []  # the views of the blocks the cells are carved from

    def take_cell(self, mem):
        """A 32-byte cell of guest memory for a request's header (16) and status (1)."""
        try:
            return self.cells.pop()
        except IndexError:
            pass
        count = 64
        gpa = mem.allocate(32 * count)
        view = mem.view(gpa, 32 * count)
        self.cell_views.append(view)
        cells = [(view, 32 * i, gpa + 32 * i) for i in range(count)]
        with self.lock:
            self.cells.extend(cells[1:])
        return cells[0]

    def shrink_slots(self):
        """Give spare fast-path slots' descriptors back to the ring; True if any were."""
        slots = self.slots
        if slots is None:
            return False
        with self.lock:
            return slots.shrink()

    def wait(self, until, deadline, what, count=1, spin=None):
        """Reap until ``until()`` holds; VhostUserTimeout at ``deadline``.

        Raises Disconnected soon after the back-end hangs up, rather than
        at the deadline; with ``reconnect=`` waits for it to come back and
        moves the deadline by the outage. A close() on another thread wakes
        it at once (``DeviceClosed``). ``spin`` goes to ``Queue.wait_used``
        (None: the queue's).
        """
        device = self.device
        with self.cond:
            while not until():
                if device._trouble():
                    self.cond.release()
                    try:
                        deadline += device._check_alive(what)
                    finally:
                        self.cond.acquire()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise VhostUserTimeout("%s: no completion from the device within the "
                                           "timeout (queue %d)" % (what, self.queue.index))
                if self.reaping:
                    self.cond.wait(remaining)
                    continue
                self.reaping = True
                self.cond.release()
                try:
                    used = self.queue.wait_used(min(remaining, _CRASH_CHECK_INTERVAL),
                                                count, spin)
                except ValueError as exc:  # the device was closed while we waited
                    raise DeviceClosed("%s: the device was closed" % what) \
                        from exc
                finally:
                    self.cond.acquire()
                    self.reaping = False
                    self.cond.notify_all()
                self._finish(used)

    def poll(self):
        with self.lock:
            if not self.reaping:
                try:
                    self._finish(self.queue.get_used())
                except ValueError as exc:
                    raise DeviceClosed("complete: the device was closed") from exc

    def reap_whole_batch(self):
        """Under the lock: the user data of the batch posted at one time, when the device
        used all of it and every request is OK; else None (what was used is in the lists)."""
        batch, used = self.queue.reap_batch()
        if batch is None:
            return None
        if used:
            self._finish(used)   # chains, not slots
        slots = self.slots
        if slots.status.tobytes() == slots.all_ok:
            slots.idle.extend(batch.run)
            slots.busy -= batch.count
            return slots.user[batch.slots]
        need = slots.need   # some status to look at
        self._finish([(k, need[k]) for k in batch.run])
        return None

    def reap_slots(self):
        """Under the lock: what the device used, into the fast-path slots' lists (poll())."""
        # The usual batch (slots, each its full length) in one lean loop;
        # anything else, and a re-armed look, as get_used.
        tokens, used = self.queue.reap_full()
        if tokens:
            slots = self.slots
            if slots.status.tobytes() != slots.all_ok:   # some status to look at
                need = slots.need
                self._finish([(k, need[k]) for k in tokens])
            else:   # each used length was what its slot needs: all done
                # In slot order (the device may complete them in another): a run
                # of slots is posted again with whole-list steps (_fill_slots).
                tokens.sort()
                first = tokens[0]
                end = first + len(tokens)
                if tokens == slots.run[first:end]:
                    slots.done.extend(slots.user[first:end])   # in a row
                else:
                    slots.done.extend(map(slots.user.__getitem__, tokens))
                slots.idle.extend(tokens)
                slots.idle.sort()   # slots idle before these may come after them in order
                slots.busy -= len(tokens)
        if used:
            self._finish(used)

    def _finish(self, used):
        slots = self.slots
        if slots is not None:
            need, status, user, done, idle = (slots.need, slots.status, slots.user,
                                              slots.done, slots.idle)
            reaped = len(idle)
            # Every status byte of the slots at once: when none is non-zero,
            # no status is looked at per request (a failed slot's byte is
            # zeroed once recorded, so one failure does not slow later reaps).
            all_ok = status.tobytes() == slots.all_ok
        for request, written in used:
            if request.__class__ is int:  # a fast-path slot (see _BlockSlots)
                if written != need[request] or not all_ok and status[request]:
                    slots.fail(request, written)
                else:
                    done.append(user[request])
                idle.append(request)
                continue
            cell = request.cell
            if cell is not None:
                request.status_buf[0] = cell[0][cell[1] + 16]
                request.cell = None
                self.cells.append(cell)
            request.written = written
            request.done = True
            if request.background:
                self.finished.append(request)
        if slots is not None:
            slots.busy -= len(idle) - reaped
            if len(idle) != reaped:
                idle.sort()   # in slot order, as reap_slots keeps it: the next post is a run


def _add_when_room(completions, readable, writable, token, timeout, what, make_room=None):
    """``Queue.add`` the chain, reaping while the ring (or guest memory) is full; no kick.

    Chains already posted are announced before any wait for room. Gives up
    (VhostUserTimeout) only after ``timeout`` seconds without any completion:
    other threads taking the room first just mean another wait. ``make_room``,
    when given, is tried first on a full ring and returns True if it freed
    something (BlockDevice gives back spare fast-path slots).
    """
    queue = completions.queue
    deadline = None   # the clock is read only when the ring is full
    while True:
        try:
            queue.add(readable, writable, token=token)
            return
        except (Queue.Full, MemoryError) as exc:
            if make_room is not None and make_room():
                continue
            if deadline is None:
                deadline = time.monotonic() + timeout
            if not queue.in_flight:
                if isinstance(exc, MemoryError) or time.monotonic() > deadline:
                    raise
                continue   # what filled the ring completed meanwhile: room now
            # Reap until something (ours or anyone's) completes, then retry.
            queue.notify()
            reaped = queue.next_used
            completions.wait(lambda: queue.next_used != reaped or not queue.in_flight,
                             deadline, what)
            deadline = time.monotonic() + timeout


############################################################################
# Block ####################################################################
############################################################################

_BLK_DRIVER_FEATURES = (
    VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC | VirtioFeature.RING_EVENT_IDX
    | _BLK_F_SIZE_MAX | _BLK_F_SEG_MAX | _BLK_F_GEOMETRY | _BLK_F_RO | _BLK_F_BLK_SIZE
    | _BLK_F_FLUSH | _BLK_F_TOPOLOGY | _BLK_F_CONFIG_WCE | _BLK_F_MQ | _BLK_F_DISCARD
    | _BLK_F_WRITE_ZEROES)
#: Largest transfer one virtio-blk request carries; larger calls are split
#: into several requests kept in flight together.
_BLK_MAX_TRANSFER = 1 << 20


class _BlockConfig(NamedTuple):
    """struct virtio_blk_config (virtio spec 5.2.4), as the device reports it.

    Decoded with the layout table ``probe`` uses (``_DEVICE_CONFIG_FIELDS``);
    a field whose feature was not acked reads as 0.
    """
    capacity: int  # in 512-byte sectors
    size_max: int
    seg_max: int
    cylinders: int
    heads: int
    sectors: int
    blk_size: int
    physical_block_exp: int
    alignment_offset: int
    min_io_size: int
    opt_io_size: int
    writeback: int
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: int


class _BlockRequest:
    """One virtio-blk request in flight: ``done``, ``status``, ``result()``."""

    __slots__ = ("op", "offset", "length", "data", "status_buf", "queue", "done",
                 "background", "written", "cell")

    def __init__(self, op, offset, length, data, queue):
        self.op = op
        self.offset = offset
        self.length = length
        self.data = data             # read target / GET_ID buffer, or None
        self.status_buf = bytearray(1)
        self.queue = queue
        self.done = False
        self.background = False
        self.written = None          # the used entry's length, once done
        self.cell = None             # (view, offset, guest address) of header and status

    @property
    def status(self):
        """The virtio-blk status byte (0 OK, 1 IOERR, 2 UNSUPP), None until done."""
        return self.status_buf[0] if self.done else None

    def result(self):
        """The data read (READ, GET_ID) or None; raises ``BackendError`` for a bad status."""
        if not self.done:
            raise ValueError("%s at offset %d is still in flight"
                             % (_BLK_OP_NAMES[self.op], self.offset))
        # Spec 2.7.8.2: nothing past the used length may be trusted, and the
        # status byte is the last device-writable byte. A shorter length means
        # the status (0, OK, in our buffer until written) and the data may be
        # stale bytes: refuse them rather than return them as if read.
        needed = 1 + (self.length if self.op in (_BLK_T_IN, _BLK_T_GET_ID) else 0)
        if self.written is not None and self.written < needed:
            raise ProtocolError("%s: the device reported %d byte(s) written (used len) for %d "
                                "bytes at offset %d; data and status need %d"
                                % (_BLK_OP_NAMES[self.op], self.written, self.length,
                                   self.offset, needed))
        status = self.status_buf[0]
        if status:
            raise BackendError("%s: virtio-blk status %s (%d) for %d bytes at offset %d"
                               % (_BLK_OP_NAMES[self.op],
                                  _BLK_STATUS_NAMES.get(status, "unknown"), status,
                                  self.length, self.offset), value=status)
        return self.data

    def __repr__(self):
        return "<BlockRequest %s offset=%d length=%d %s>" % (
            _BLK_OP_NAMES[self.op], self.offset, self.length,
            "status=%d" % self.status_buf[0] if self.done else "in flight")


class _BlockSlots:
    """One queue's zero-copy request slots, for ``BlockDevice.post_reads``/``post_writes``.

    Slot k is a chain built once: header k of a header array, the caller's
    data buffer (from ``BlockDevice.alloc``), status byte k of a status
    array, all in guest memory. Posting a slot writes the sector into its
    header in place and repoints its data descriptor only when the buffer
    or the direction changed; a batch of slots is published at once. The
    per-slot lists are indexed by k; ``idle`` holds the built slots not in
    flight. Guarded by the queue's ``_Completions.lock``.
    """

    def __init__(self, mem, queue):
        self.queue = queue
        self.limit = queue.size // 3   # header, data and status descriptors each
        self.headers = mem.allocate(16 * self.limit)
        self.statuses = mem.allocate(self.limit)
        self.header = mem.view(self.headers, 16 * self.limit).cast("Q")  # type, sector
        self.types = self.header[0::2]      # type and reserved as one u64: type
        self.sectors = _FieldStores(self.header, 8, 16)   # stored once per request
        self.status = mem.view(self.statuses, self.limit)
        self.all_ok = bytes(self.limit)
        self.status[:] = self.all_ok
        self.heads = []     # k -> the queue's slot, None when its descriptors were given back
        # heads[k] of the built slots, for whole runs of consecutive slots at once.
        self.head_array = array.array("H", bytes(2 * self.limit))
        self.run = list(range(self.limit))   # a run k..k+n is run[k:k + n]
        self.batches = {}   # (k, n) -> the _SlotBatch of the run k..k+n (None: not one)
        self.idle = []      # built slots not in flight
        self.unbuilt = []   # k whose descriptors were given back
        self.buffer = []    # k -> the alloc entry its data descriptor points at
        self.op = []
        # op -> [k -> the entry, when k's data descriptor points at it in op's direction]
        self.ready_for = {_BLK_T_IN: [], _BLK_T_OUT: []}
        self.view_for = {_BLK_T_IN: [], _BLK_T_OUT: []}   # the same, its view
        self.need = []      # k -> the used length of a complete request: data read + status
        self.user = []
        self.done = []      # user data of requests completed OK, for reap
        self.failed = []    # (user data, op, offset, length, status, used length)
        self.busy = 0

    def grow(self, wanted):
        """Build up to ``wanted`` more slots while the ring has descriptors for them."""
        queue = self.queue
        while wanted > 0 and queue.num_free >= 3 and (self.unbuilt
                                                      or len(self.heads) < self.limit):
            if self.unbuilt:
                k = self.unbuilt.pop()
            else:
                k = len(self.heads)
                for column in (self.heads, self.buffer, self.op, self.need, self.user,
                               self.ready_for[_BLK_T_IN], self.ready_for[_BLK_T_OUT],
                               self.view_for[_BLK_T_IN], self.view_for[_BLK_T_OUT]):
                    column.append(None)
            status = (self.statuses + k, 1)
            # The data descriptor points at the status byte until the first post.
            try:
                self.heads[k] = queue.add_slot([(self.headers + 16 * k, 16), status], [status])
            except Queue.Full:   # another thread's request took the descriptors meanwhile
                self.unbuilt.append(k)
                return
            self.head_array[k] = self.heads[k]
            self.batches = {}
            self.point(k, None, None)
            self.idle.append(k)
            wanted -= 1

    def point(self, k, entry, op):
        """Point slot k's data descriptor at buffer ``entry`` for ``op`` (None: at nothing)."""
        if entry is not None:
            self.queue.repoint_slot(self.heads[k], 1, entry[1], entry[2], op == _BLK_T_IN)
            self.types[k] = op
            self.need[k] = entry[2] + 1 if op == _BLK_T_IN else 1
        self.buffer[k] = entry
        self.op[k] = op
        self.batches = {}   # its used length may change
        for direction, ready in self.ready_for.items():
            ready[k] = entry if direction == op else None
            self.view_for[direction][k] = entry[0] if direction == op else None

    def shrink(self):
        """Give the idle slots' descriptors back to the ring; True if there were any."""
        idle, self.idle = self.idle, []
        for k in idle:
            self.queue.remove_slot(self.heads[k])
            self.heads[k] = None
            self.unbuilt.append(k)
        self.batches = {}
        return bool(idle)

    def fail(self, k, written):
        self.failed.append((self.user[k], self.op[k], self.header[2 * k + 1] << 9,
                            self.buffer[k][2], self.status[k], written))
        self.status[k] = 0   # recorded (see _Completions._finish)

    def release(self):
        for view in (self.types, self.sectors, self.header, self.status):
            view.release()


def _fast_path_error(failed, completed):
    """The exception ``BlockDevice.reap`` raises for failed requests (the first one's)."""
    user_data, op, offset, length, status, written = failed[0]
    name = _BLK_OP_NAMES[op]
    need = length + 1 if op == _BLK_T_IN else 1
    if written != need:
        # Spec 2.7.8.2: bytes past the used length, the status among them, are not to be trusted.
        error = ProtocolError("%s: the device reported %d byte(s) written (used len) for %d bytes "
                              "at offset %d (user_data %r); data and status need %d"
                              % (name, written, length, offset, user_data, need))
    else:
        error = BackendError("%s: virtio-blk status %s (%d) for %d bytes at offset %d "
                             "(user_data %r)" % (name, _BLK_STATUS_NAMES.get(status, "unknown"),
                                                 status, length, offset, user_data),
                             value=status)
    error.user_data = user_data
    error.failed = [entry[0] for entry in failed]
    error.completed = completed
    return error


class BlockDevice(_Device):
    """A virtio-blk disk served by a vhost-user back-end, as a Python object.

    Reads and writes are checked against the block size and capacity before
    anything is sent, split into requests the device accepts (seg_max,
    size_max, and at most ``max_transfer`` bytes each) that are kept in flight
    together, and a failed request raises ``BackendError`` whose ``value`` is
    the virtio-blk status (1 IOERR, 2 UNSUPP). ``submit_read``/``submit_write``
    /``submit_flush`` and ``complete`` keep many requests in flight; the simple
    calls are built on them. Each queue may be used from its own thread (pass
    ``queue=``), and a queue may be shared by threads too.

    Args:
        frontend: a connected front-end for a BLOCK device (features not yet
            acked); the device owns and closes it.
        num_queues: queues to use; None for all the device has.
        queue_size: ring size, capped by the back-end's maximum.
        timeout: seconds to wait for any completion.
        memory_size: bytes of guest memory for rings and bounce buffers.
        max_segment_size: cap on the bytes one data descriptor describes
            (the device's size_max also applies), e.g. 4096 to build
            page-sized scatter lists like a guest kernel.
        packed: None uses packed rings when the back-end offers RING_PACKED
            (and the front-end was built with ``packed=True``, as ``connect``
            does), True requires them, False never uses them.
        spin: seconds a completion wait polls the used ring before sleeping
            on the call eventfd; None picks it from where the back-end runs
            (``placement``: 0 when both sides share one CPU, else a spin
            that adapts to how long the back-end takes, up to 1 ms).
        event_idx: False refuses RING_EVENT_IDX (a call per completion);
            None negotiates it and asks for calls only when about to sleep.
        reconnect: None (the default): a back-end that goes away fails
            every call with ``Disconnected``. SECONDS: wait that long for the
            socket to accept again, redo the handshake and resubmit every
            request in flight, in order, once; callers just wait longer (their
            timeout is extended by the outage). Needs the socket path. A
            back-end offering INFLIGHT_SHMFD (``connect`` asks for it)
            resubmits what it had taken itself, and only the rest is
            offered again (``VhostUserFrontend.reconnect``).

    ``placement`` says what was chosen: the back-end's pid (SO_PEERCRED),
    whether both sides are pinned to one CPU, spin, event_idx, defer_calls,
    spin_max (0: the spin is fixed).
    """

    def __init__(self, frontend: VhostUserFrontend, num_queues: Optional[int] = None,
                 queue_size: int = 128, timeout: float = 5.0, memory_size: int = 64 << 20,
                 max_segment_size: Optional[int] = None, spin: Optional[float] = None,
                 event_idx: Optional[bool] = None, reconnect: Optional[float] = None,
                 packed: Optional[bool] = None) -> None:
        self._frontend = frontend
        self.timeout = timeout
        self._inside = []
        self._buffers = {}   # id(view) -> (view, guest address, size, last fast-path offset)
        # The lowest last offset of the buffers alloc() made for the fast path:
        # a batch whose offsets all lie in 0..this needs no bound check each.
        self._last_offset_all = -1
        try:
            self._init_reconnect(reconnect)
            self.placement = _placement(frontend.client, spin, event_idx)
            self._setup(num_queues, queue_size, memory_size, max_segment_size, packed)
        except BaseException:
            self.close()
            raise

    @classmethod
    def connect(cls, path: _Connection, num_queues: Optional[int] = None, queue_size: int = 128,
                timeout: float = 5.0, packed: Optional[bool] = None,
                **kwargs: Any) -> "BlockDevice":
        """Connect to the vhost-user-blk socket at ``path``, negotiate and activate.

        ``path`` may also be a connected socket or a ``BackendClient``; other
        keyword arguments (``reconnect=`` ...) go to the constructor.
        ``timeout`` also bounds the wait for the socket to accept.
        """
        return cls._connect_device(
            DeviceType.BLOCK, _BLK_DRIVER_FEATURES, path, timeout, kwargs.get("reconnect"),
            lambda frontend: cls(frontend, num_queues=num_queues, queue_size=queue_size,
                                 timeout=timeout, packed=packed, **kwargs), packed)

    def _setup(self, num_queues, queue_size, memory_size, max_segment_size, packed):
        frontend = self._frontend
        offered = frontend.features()
        _refuse_other_device_type(frontend, DeviceType.BLOCK)
        if not frontend.protocol_features & _P.CONFIG:
            # QEMU's vhost-user-blk refuses such a back-end too: capacity is in the config.
            raise FeatureNotNegotiated("virtio-blk: wrong device type: the back-end does not "
                                       "offer CONFIG, so it cannot be a vhost-user-blk device",
                                       FrontendReq.GET_CONFIG)
        if not offered & VirtioFeature.VERSION_1:
            raise FeatureNotNegotiated("virtio-blk: the back-end does not offer VERSION_1")
        sizes = frontend.queue_max_sizes()
        self.packed = _use_packed(offered, packed, min([queue_size] + sizes), "virtio-blk")
        wanted = _BLK_DRIVER_FEATURES
        if not self.placement.event_idx:
            wanted &= ~VirtioFeature.RING_EVENT_IDX
        if self.packed:
            wanted |= VirtioFeature.RING_PACKED
        self.features = offered & wanted
        frontend.ack_features(self.features)
        config, self.block_size = self._read_config(frontend)
        self.config = config
        has = self.features.__and__
        if self.block_size < _SECTOR or self.block_size & (self.block_size - 1):
            raise ProtocolError("GET_CONFIG: virtio-blk blk_size %d is not a power of two "
                                ">= 512" % self.block_size, FrontendReq.GET_CONFIG)
        self.capacity = config.capacity * _SECTOR
        self.read_only = bool(has(_BLK_F_RO))
        max_sizes = frontend.queue_max_sizes()
        available = len(max_sizes)
        if has(_BLK_F_MQ):
            available = min(available, config.num_queues)
        else:
            available = 1
        if num_queues is None:
            num_queues = available
        if not 1 <= num_queues <= available:
            raise ValueError("virtio-blk: num_queues %r, the device has 1..%d"
                             % (num_queues, available))
        self.num_queues = num_queues
        size = min(queue_size, *max_sizes[:num_queues])
        # Data descriptors per request: seg_max, and room for header and status.
        segments = size - 2
        if has(_BLK_F_SEG_MAX) and config.seg_max:
            segments = min(segments, config.seg_max)
        if segments < 1:
            raise ValueError("virtio-blk: queue size %d leaves no room for data" % size)
        segment = _MAX_DESC_LEN
        if has(_BLK_F_SIZE_MAX) and config.size_max:
            segment = config.size_max
        if max_segment_size is not None:
            segment = min(segment, max_segment_size)
        self._segment = segment
        transfer = min(_BLK_MAX_TRANSFER, segments * segment)
        self.max_transfer = transfer - transfer % self.block_size
        if self.max_transfer < self.block_size:
            raise ValueError("virtio-blk: %d segment(s) of %d bytes cannot carry one "
                             "%d-byte block" % (segments, segment, self.block_size))
        self._mem = GuestMemory([(0, memory_size)], name="vhost-user-blk")
        queues = []
        for index in range(num_queues):
            # Re-entrant: _Completions routes completions under the same lock.
            queues.append(Queue(self._mem, size, index, features=self.features,
                                lock=threading.RLock()))
            self._queues = queues
            queues[-1].spin = self.placement.spin
            queues[-1].spin_max = self.placement.spin_max
            queues[-1].defer_calls = self.placement.defer_calls
        self._completions = [_Completions(q, self) for q in queues]
        # What _completions_for would return for each queue, while open: the
        # fast path's look-up (emptied by close()).
        self._open_completions = dict(enumerate(self._completions))
        frontend.reconnect_check = self._check_config_again
        frontend.activate(self._mem, None, queues)

    def _read_config(self, frontend):
        """(_BlockConfig, block size) from GET_CONFIG, for the acked features."""
        # Read only the fields the acked features make exist, as QEMU sizes
        # it: a back-end with a shorter config refuses a longer read.
        data = frontend.read_config(0, _device_config_size(DeviceType.BLOCK, self.features))
        fields = _config_values(DeviceType.BLOCK, self.features, data)
        config = _BlockConfig._make(fields.get(name, 0) for name in _BlockConfig._fields)
        return config, config.blk_size if self.features & _BLK_F_BLK_SIZE else _SECTOR

    def _check_config_again(self, frontend, what):
        """Re-read the config of a back-end that came back (``reconnect``) or that the
        device moves to (``move_to``), before the rings; returns a callable that
        records it, called once the device uses that back-end.

        Raises:
            Disconnected: its capacity, block size or queue count shrank (a
                smaller disk would answer IOERR to what is in flight); the
                message names ``what`` and what changed.
        """
        config, block_size = self._read_config(frontend)
        changed = []
        if config.capacity * _SECTOR < self.capacity:
            changed.append("capacity %d bytes, was %d" % (config.capacity * _SECTOR,
                                                           self.capacity))
        if block_size != self.block_size:
            changed.append("block size %d, was %d" % (block_size, self.block_size))
        if self.features & _BLK_F_MQ and config.num_queues < self.num_queues:
            changed.append("num_queues %d, %d in use" % (config.num_queues, self.num_queues))
        if changed:
            raise BackendShrank("%s: the back-end %s another disk: %s"
                                % (what, "came back with" if what == "reconnect" else "serves",
                                   "; ".join(changed)), FrontendReq.GET_CONFIG)

        def record():
            self.config = config
            self.capacity = config.capacity * _SECTOR
        return record

    # -- properties from the config space ---------------------------------------

    @property
    def topology(self) -> Optional[Tuple[int, int, int, int]]:
        """(physical_block_exp, alignment_offset, min_io_size, opt_io_size), or None.

        None when the device does not offer BLK_TOPOLOGY.
        """
        if not self.features & _BLK_F_TOPOLOGY:
            return None
        c = self.config
        return c.physical_block_exp, c.alignment_offset, c.min_io_size, c.opt_io_size

    @property
    def writeback(self) -> bool:
        """True when the device caches writes (CONFIG_WCE): call ``flush()``."""
        return bool(self.config.writeback) if self.features & _BLK_F_CONFIG_WCE else \
            bool(self.features & _BLK_F_FLUSH)

    @property
    def max_discard_sectors(self) -> int:
        """Largest DISCARD in 512-byte sectors; 0 without DISCARD."""
        return self.config.max_discard_sectors if self.features & _BLK_F_DISCARD else 0

    @property
    def max_write_zeroes_sectors(self) -> int:
        """Largest WRITE_ZEROES in 512-byte sectors; 0 without WRITE_ZEROES."""
        return self.config.max_write_zeroes_sectors \
            if self.features & _BLK_F_WRITE_ZEROES else 0

    # -- asynchronous requests ---------------------------------------------------

    def submit_read(self, offset: int, length: int, queue: int = 0,
                    buffer: Optional[_WBuffer] = None, notify: bool = True) -> _BlockRequest:
        """Start a READ of at most ``max_transfer`` bytes; returns its request.

        ``buffer`` (writable, ``length`` bytes) receives the data; by default a
        new bytearray, available as ``request.result()`` once done. With
        ``notify=False`` the device is not kicked yet: submit a batch, then
        ``complete()`` (or a simple call on the queue) kicks once for all.
        """
        self._check_range("READ", offset, length, self.max_transfer)
        if buffer is None:
            buffer = bytearray(length)
        request = _BlockRequest(_BLK_T_IN, offset, length, buffer, queue)
        request.background = True
        self._post(request, (), self._guest_segments(buffer, 0, length)
                   or self._segments(memoryview(buffer).cast("B")), notify)
        return request

    def submit_write(self, offset: int, data: _Buffer, queue: int = 0,
                     notify: bool = True) -> _BlockRequest:
        """Start a WRITE of at most ``max_transfer`` bytes; returns its request."""
        segments = self._guest_segments(data, 0, None)
        data = memoryview(data).cast("B")
        self._check_writable("WRITE")
        self._check_range("WRITE", offset, len(data), self.max_transfer)
        request = _BlockRequest(_BLK_T_OUT, offset, len(data), None, queue)
        request.background = True
        self._post(request, segments or self._segments(data), (), notify)
        return request

    def submit_flush(self, queue: int = 0, notify: bool = True) -> _BlockRequest:
        """Start a FLUSH; returns its request.

        Raises:
            FeatureNotNegotiated: the device does not offer BLK_FLUSH, and
                spec 5.2.6.1 forbids the request then (``flush()`` is a no-op).
        """
        if not self.features & _BLK_F_FLUSH:
            raise FeatureNotNegotiated("FLUSH: the device does not offer it (VIRTIO_BLK_F_FLUSH)")
        request = _BlockRequest(_BLK_T_FLUSH, 0, 0, None, queue)
        request.background = True
        self._post(request, (), (), notify)
        return request

    def complete(self, queue: int = 0, timeout: Optional[float] = None,
                 count: int = 1) -> List[_BlockRequest]:
        """Wait for requests started with ``submit_*`` on ``queue``; returns the done ones.

        Kicks the device first if requests were submitted with
        ``notify=False``. Waits until at least ``count`` of them are done (or
        none is in flight) and returns every one done so far. Check each with
        ``result()``.

        Raises:
            VhostUserTimeout: nothing completed within ``timeout`` (default
                the device's).
        """
        completions = self._completions_for(queue, "complete")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        q = completions.queue
        with self._call("complete"):
            q.notify()
            completions.poll()
            completions.wait(lambda: len(completions.finished) >= count or not q.in_flight,
                             deadline, "complete")
        with completions.cond:
            done, completions.finished = completions.finished, []
        return done

    # -- zero-copy fast path (libblkio's queue API, io_uring's fixed buffers) -----

    def alloc(self, size: int) -> memoryview:
        """A writable buffer of ``size`` bytes in guest memory: I/O into it is zero-copy.

        ``post_reads``/``post_writes`` take only such buffers (at most
        ``max_transfer`` bytes each); every other call accepts them too and
        then copies nothing. ``free`` gives the memory back; ``close``
        releases every buffer (a later access raises ValueError).

        Raises:
            MemoryError: guest memory (``memory_size``) is exhausted.
        """
        if not isinstance(size, int) or size <= 0:
            raise ValueError("alloc: size must be a positive int, got %r" % (size,))
        if self._mem is None or self._closing:
            raise DeviceClosed("alloc: the device was closed")
        gpa = self._mem.allocate(size, align=4096 if size >= 4096 else 16)
        view = self._mem.view(gpa, size)
        # The last offset a fast-path request on it may start at; -1: too big for one.
        fits = size <= min(self.max_transfer, self._segment) and not size % self.block_size
        last_offset = self.capacity - size if fits else -1
        self._buffers[id(view)] = (view, gpa, size, last_offset)
        if fits and (self._last_offset_all < 0 or last_offset < self._last_offset_all):
            self._last_offset_all = last_offset
        return view

    def free(self, buffer: memoryview) -> None:
        """Give a buffer from ``alloc`` back (not while a request uses it)."""
        entry = self._buffers.get(id(buffer))
        if entry is None or entry[0] is not buffer:
            raise ValueError("free: not a buffer from this device's alloc()")
        for completions in self._completions:
            slots = completions.slots
            if slots is not None:
                for k, pointed in enumerate(slots.buffer):
                    if pointed is entry:
                        if k not in slots.idle and k not in slots.unbuilt:
                            raise ValueError("free: a request on this buffer is in flight")
                        slots.point(k, None, None)
        del self._buffers[id(buffer)]
        buffer.release()
        self._mem.free(entry[1])

    def post_reads(self, offsets: Sequence[int], buffers: Sequence[memoryview],
                   user_data: Optional[Sequence[Any]] = None, queue: int = 0,
                   notify: bool = True) -> None:
        """Start READs of ``len(buffers[i])`` bytes at ``offsets[i]`` into ``alloc`` buffers.

        The fast path: nothing is copied or allocated per request, the ring
        is written once for the batch and the device kicked once (unless
        ``notify=False``: ``reap`` kicks then). Waits for free slots while
        the ring is full. ``reap`` returns ``user_data[i]`` (default the
        offset) once request i completed. As with any DMA buffer, a buffer
        must not be in two requests at once, nor touched while in flight.

        Raises:
            ValueError: a buffer not from ``alloc``, or an offset that is not a
                multiple of the block size or ends past the capacity;
                nothing of the batch was posted from that request on.
        """
        self._post_fast(_BLK_T_IN, offsets, buffers, user_data, queue, notify)

    def post_writes(self, offsets: Sequence[int], buffers: Sequence[memoryview],
                    user_data: Optional[Sequence[Any]] = None, queue: int = 0,
                    notify: bool = True) -> None:
        """Start WRITEs of ``alloc`` buffers at ``offsets``; as ``post_reads``."""
        self._check_writable("WRITE")
        self._post_fast(_BLK_T_OUT, offsets, buffers, user_data, queue, notify)

    def reap(self, queue: int = 0, count: int = 1,
             timeout: Optional[float] = None) -> List[Any]:
        """Wait for ``count`` fast-path requests on ``queue`` to complete; their user data.

        Returns every one completed so far (fewer than ``count`` only when
        no more are in flight), each checked: the used length covers data
        and status, and the status is OK.

        Raises:
            BackendError: a request failed (``value`` is the virtio-blk
                status, ``user_data`` the request's, ``failed`` all failed
                ones' and ``completed`` the user data of those that did not
                fail in this reap).
            ProtocolError: the device reported less written than a request's
                data and status (same attributes).
            VhostUserTimeout: none completed within ``timeout`` (default the
                device's).
        """
        completions = self._open_completions.get(queue)
        if completions is None or queue.__class__ is not int:
            completions = self._completions_for(queue, "reap")   # raises for a bad queue
        slots = completions.slots
        if slots is None:
            return []
        inside = self._inside
        inside.append(None)    # _call() spelled out: this is the fast path
        try:
            if self._closing:
                raise DeviceClosed("reap: the device was closed")
            q = completions.queue
            if q.kick_pending:   # posted with notify=False: kick now
                q.notify()
            if q.spin and len(slots.done) < count and slots.busy and not slots.failed:
                # Spin first, as wait_used would, then take what the device used
                # with the lean path below. Not the other way round: looking first
                # and spinning only when nothing was there is a branch that goes
                # either way at random, which PyPy's JIT keeps compiling bridges
                # for (see _SPIN_RUN).
                q.spin_for_used(q.spin)
            # The usual case takes the lock (the queue's too) once: reap what the
            # device used (when no other thread is reaping) and hand it over.
            with completions.lock:
                if len(slots.done) < count and not slots.failed and not completions.reaping:
                    if not slots.done:
                        # The usual reap: the batch posted at one time, all used
                        # at once, each complete and OK, in one step.
                        done = completions.reap_whole_batch()
                        if done is not None:
                            return done   # no more in flight
                    completions.reap_slots()
                done = slots.done
                ready = len(done) + len(slots.failed)
                want = ready + slots.busy
                if count < want:
                    want = count
                if ready >= want:
                    if slots.failed:
                        return self._take_reaped(slots)
                    slots.done = []
                    return done
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            completions.wait(lambda: len(slots.done) + len(slots.failed) >= want,
                             deadline, "reap", want - ready, spin=0)
            with completions.lock:
                return self._take_reaped(slots)
        except (ValueError, OSError) as exc:
            self._closed_error("reap", exc)
            raise
        finally:
            inside.pop()

    @staticmethod
    def _take_reaped(slots):
        """The user data of the slots reaped so far; raises for failed ones."""
        done, slots.done = slots.done, []
        if slots.failed:
            failed, slots.failed = slots.failed, []
            raise _fast_path_error(failed, done)
        return done

    def _post_fast(self, op, offsets, buffers, user_data, queue, notify):
        inside = self._inside
        inside.append(None)    # _call() spelled out: this is the fast path
        try:
            if self._trouble():
                self._check_alive(_BLK_OP_NAMES[op])
            completions = self._open_completions.get(queue)
            if completions is None or queue.__class__ is not int:
                completions = self._completions_for(queue, _BLK_OP_NAMES[op])   # a bad queue
            slots = completions.slots
            if slots is None:
                slots = completions.slots = _BlockSlots(self._mem, completions.queue)
            count = len(offsets)
            if user_data is None:
                user_data = offsets
            if not count:
                return
            if len(buffers) != count or len(user_data) != count:
                raise ValueError("%s: %d offsets, %d buffers and %d user_data values"
                                 % (_BLK_OP_NAMES[op], count, len(buffers), len(user_data)))
            q = completions.queue
            lock = completions.lock
            posted = 0
            deadline = None
            kick = False
            while True:
                with lock:
                    idle = slots.idle
                    chunk = count - posted
                    if len(idle) < chunk:
                        slots.grow(chunk - len(idle))
                        chunk = min(chunk, len(idle))
                    if chunk:
                        # The usual post: the run of slots of a batch posted before,
                        # idle again, in one step (the queue's lock is this one).
                        split = len(idle) - chunk
                        taken = idle[split:]
                        del idle[split:]
                        try:
                            q.check_usable()
                            batch = self._fill_slots(slots, taken, op, offsets, buffers,
                                                     user_data, posted)
                        except BaseException:
                            idle.extend(taken)
                            raise
                        slots.busy += chunk
                        posted += chunk
                        # notify() in the same hold of the lock; or, when more
                        # must wait for room, announce these first.
                        wants = notify or posted != count
                        if batch is not None:   # a run of slots in a row
                            kick = q.post_batch(batch, wants)
                        else:
                            q.post_run([slots.heads[k] for k in taken], taken)
                            kick = wants and q.kick_due()
                    elif not q.in_flight:
                        raise Queue.Full("%s: queue %d has no descriptors for a request"
                                         % (_BLK_OP_NAMES[op], queue))
                if kick:
                    kick = False
                    q.kick.signal()
                if posted == count:
                    return
                if deadline is None:
                    deadline = time.monotonic() + self.timeout
                free = q.num_free
                completions.wait(lambda: slots.idle or q.num_free > free or not q.in_flight,
                                 deadline, _BLK_OP_NAMES[op])
        except (ValueError, OSError) as exc:
            self._closed_error(_BLK_OP_NAMES[op], exc)
            raise
        finally:
            inside.pop()

    def _fill_slots(self, slots, taken, op, offsets, buffers, user_data, first):
        """Point slots ``taken`` at requests ``first``...: the per-request work, kept small.

        Under the queue's lock; once every request passed its checks, stores
        their user data. Returns the ``_SlotBatch`` when they are a run of
        slots in a row of one used length (posted with ``_post_slot_batch``),
        else None (posted with ``_post_slots``).
        """
        views, sectors = slots.view_for[op], slots.sectors
        mask = self.block_size - 1
        last = self._last_offset_all
        count = len(taken)
        end = first + count
        if first or end < len(offsets):
            offsets, buffers, user_data = (offsets[first:end], buffers[first:end],
                                           user_data[first:end])
        try:
            for k, offset, buffer in zip(taken, offsets, buffers):
                # A slot already pointing at this very view (for this direction)
                # needs no registry look-up: free() repoints the slots of a view.
                # An offset past ``last`` may still fit its own buffer: looked at then.
                if views[k] is not buffer or offset & mask or offset > last:
                    self._check_fast_request(slots, k, op, offset, buffer,
                                             first + taken.index(k))
                # 512-byte sectors whatever blk_size is; a negative offset's
                # store raises (an unsigned field), and is named below.
                sectors[k] = offset >> 9
        except (ValueError, struct.error):
            for i, (k, offset, buffer) in enumerate(zip(taken, offsets, buffers)):
                self._check_fast_request(slots, k, op, offset, buffer, first + i)
            raise
        start = taken[0]
        if taken == slots.run[start:start + count]:   # the usual batch: slots in a row
            slots.user[start:start + count] = user_data
            batch = slots.batches.get((start, count), False)
            return _SlotBatch.make(slots, start, count) if batch is False else batch
        user = slots.user
        for k, value in zip(taken, user_data):
            user[k] = value
        return None

    def _check_fast_request(self, slots, k, op, offset, buffer, index):
        """Refuse request ``index`` of a batch, or point slot k at its buffer."""
        # An id in the registry is the view registered under it: the registry
        # keeps that view alive, so no other object can have its id meanwhile.
        entry = self._buffers.get(id(buffer))
        if entry is None or offset & (self.block_size - 1) or not 0 <= offset <= entry[3]:
            self._fast_path_misuse(op, index, offset, buffer, entry)
        if slots.ready_for[op][k] is not entry:
            slots.point(k, entry, op)

    def _fast_path_misuse(self, op, index, offset, buffer, entry):
        name = _BLK_OP_NAMES[op]
        if entry is None:
            raise ValueError("%s: buffers[%d] is not a buffer from this device's alloc() "
                             "(or it was freed)" % (name, index))
        self._check_range(name, offset, entry[2], self.max_transfer)
        raise ValueError("%s: buffers[%d] has %d bytes; one fast-path request carries a "
                         "multiple of the block size %d up to %d" % (
                             name, index, entry[2], self.block_size,
                             min(self.max_transfer, self._segment)))

    # -- simple calls ------------------------------------------------------------

    def read(self, offset: int, length: int, queue: int = 0) -> bytes:
        """Read ``length`` bytes at ``offset`` (both multiples of ``block_size``)."""
        # Checked before the buffer is made: bytearray(2**70) is an OverflowError.
        self._check_range("READ", offset, length, None)
        buffer = bytearray(length)
        self.readinto(offset, buffer, queue)
        return bytes(buffer)

    def readinto(self, offset: int, buffer: _WBuffer, queue: int = 0) -> int:
        """Read ``len(buffer)`` bytes at ``offset`` into ``buffer``; returns the count."""
        view = memoryview(buffer).cast("B")
        self._check_range("READ", offset, len(view), None)
        requests = []
        for start in range(0, len(view), self.max_transfer):
            piece = view[start:start + self.max_transfer]
            request = _BlockRequest(_BLK_T_IN, offset + start, len(piece), None, queue)
            requests.append(request)
            self._post(request, (), self._guest_segments(buffer, start, len(piece))
                       or self._segments(piece), notify=False)
        self._finish(requests, "READ")
        return len(view)

    def write(self, offset: int, data: _Buffer, queue: int = 0) -> None:
        """Write ``data`` at ``offset`` (offset and length multiples of ``block_size``)."""
        view = memoryview(data).cast("B")
        self._check_writable("WRITE")
        self._check_range("WRITE", offset, len(view), None)
        requests = []
        for start in range(0, len(view), self.max_transfer):
            piece = view[start:start + self.max_transfer]
            request = _BlockRequest(_BLK_T_OUT, offset + start, len(piece), None, queue)
            requests.append(request)
            self._post(request, self._guest_segments(data, start, len(piece))
                       or self._segments(piece), (), notify=False)
        self._finish(requests, "WRITE")

    def flush(self, queue: int = 0) -> None:
        """Make completed writes durable (FLUSH); a no-op without BLK_FLUSH."""
        if not self.features & _BLK_F_FLUSH:
            return
        request = _BlockRequest(_BLK_T_FLUSH, 0, 0, None, queue)
        self._post(request, (), ())
        self._finish([request], "FLUSH")

    def discard(self, offset: int, length: int, queue: int = 0) -> None:
        """Tell the device ``length`` bytes at ``offset`` are unused (DISCARD)."""
        self._ranged(_BLK_T_DISCARD, _BLK_F_DISCARD, self.max_discard_sectors, offset,
                     length, 0, queue)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False,
                     queue: int = 0) -> None:
        """Zero ``length`` bytes at ``offset`` without sending zeroes (WRITE_ZEROES)."""
        self._ranged(_BLK_T_WRITE_ZEROES, _BLK_F_WRITE_ZEROES, self.max_write_zeroes_sectors,
                     offset, length, 1 if unmap else 0, queue)

    def get_id(self, queue: int = 0) -> bytes:
        """The device's serial (GET_ID), up to 20 bytes, without NUL padding."""
        buffer = bytearray(_BLK_ID_BYTES)
        request = _BlockRequest(_BLK_T_GET_ID, 0, _BLK_ID_BYTES, None, queue)
        self._post(request, (), (buffer,))
        self._finish([request], "GET_ID")
        return bytes(buffer).split(b"\0", 1)[0]

    # -- plumbing ----------------------------------------------------------------

    def _ranged(self, op, feature, max_sectors, offset, length, flags, queue):
        name = _BLK_OP_NAMES[op]
        if not self.features & feature:
            raise FeatureNotNegotiated("%s: the device does not offer it" % name)
        self._check_writable(name)
        self._check_range(name, offset, length, None)
        # A limit of 0 means none, as Linux reads it; num_sectors is a u32.
        step = (max_sectors or 0xFFFFFFFF) * _SECTOR
        step -= step % self.block_size
        step = step or self.block_size
        requests = []
        for start in range(0, length, step):
            size = min(step, length - start)
            segment = _BLK_DISCARD_SEG.pack((offset + start) // _SECTOR, size // _SECTOR, flags)
            request = _BlockRequest(op, offset + start, size, None, queue)
            requests.append(request)
            self._post(request, (segment,), (), notify=False)
        self._finish(requests, name)

    def _guest_segments(self, buffer, start, length):
        """(guest_addr, length) segments when ``buffer`` came from ``alloc``, else None."""
        entry = self._buffers.get(id(buffer))
        if entry is None or entry[0] is not buffer:
            return None
        if length is None:
            length = entry[2] - start
        gpa = entry[1] + start
        step = self._segment
        return [(gpa + i, min(step, length - i)) for i in range(0, length, step)]

    def _segments(self, view):
        step = self._segment
        if len(view) <= step:
            return (view,)
        return [view[i:i + step] for i in range(0, len(view), step)]

    def _check_writable(self, what):
        if self.read_only:
            raise ReadOnlyDevice("%s: the device is read-only (VIRTIO_BLK_F_RO)" % what)

    def _check_range(self, what, offset, length, limit):
        if not isinstance(offset, int) or not isinstance(length, int):
            raise TypeError("%s: offset and length must be ints, got %r and %r"
                            % (what, offset, length))
        if offset < 0 or length < 0 or offset % self.block_size or length % self.block_size:
            raise ValueError("%s: offset %d and length %d must be non-negative multiples "
                             "of the block size %d" % (what, offset, length, self.block_size))
        if offset + length > self.capacity:
            raise ValueError("%s: %d bytes at offset %d end past the capacity %d"
                             % (what, length, offset, self.capacity))
        if limit is not None and not 0 < length <= limit:
            raise ValueError("%s: length %d is not in 1..%d (max_transfer)"
                             % (what, length, limit))

    def _completions_for(self, queue, what):
        if self._mem is None or self._closing:
            raise DeviceClosed("%s: the device was closed" % what)
        if not isinstance(queue, int) or not 0 <= queue < self.num_queues:
            raise ValueError("queue %r out of range 0..%d" % (queue, self.num_queues - 1))
        return self._completions[queue]

    def _post(self, request, readable, writable, notify=True):
        """Add the request's chain, waiting for room while the ring is full.

        With ``notify=False`` the caller kicks once after posting a batch;
        chains already posted are announced before any wait for room.
        """
        with self._call(_BLK_OP_NAMES[request.op]):
            self._post_chain(request, readable, writable, notify)

    def _post_chain(self, request, readable, writable, notify):
        completions = self._completions_for(request.queue, _BLK_OP_NAMES[request.op])
        if self._trouble():
            self._check_alive(_BLK_OP_NAMES[request.op])
        # Header and status live in a cell of guest memory: the header is
        # written in place, the status copied out when the request completes.
        cell = request.cell = completions.take_cell(self._mem)
        view, offset, gpa = cell
        _BLK_REQ.pack_into(view, offset, request.op, 0, request.offset // _SECTOR)
        view[offset + 16] = 0
        readable = [(gpa, _BLK_REQ.size)] + list(readable)
        writable = list(writable) + [(gpa + _BLK_REQ.size, 1)]
        try:
            _add_when_room(completions, readable, writable, request, self.timeout,
                           _BLK_OP_NAMES[request.op], make_room=completions.shrink_slots)
        except BaseException:
            request.cell = None
            completions.cells.append(cell)
            raise
        if notify:
            completions.queue.notify()

    def _finish(self, requests, what):
        """Kick for the posted batch, wait for all of it, raise the first bad status."""
        if not requests:
            return
        completions = self._completions_for(requests[0].queue, what)
        deadline = time.monotonic() + self.timeout
        with self._call(what):
            completions.queue.notify()
            completions.wait(lambda: all(r.done for r in requests), deadline, what)
        for request in requests:
            request.result()

    def _wake_waiters(self):
        _Device._wake_waiters(self)
        for completions in getattr(self, "_completions", ()):
            with completions.cond:
                completions.cond.notify_all()

    def _release_buffers(self):
        """Release every ``alloc`` buffer and slot (close, once the rings stopped)."""
        for completions in getattr(self, "_completions", ()):
            if completions.slots is not None:
                completions.slots.release()
            for view in completions.cell_views:
                view.release()
            completions.cells = completions.cell_views = []
        buffers, self._buffers = self._buffers, {}
        for view, _, _, _ in buffers.values():
            view.release()

    def __repr__(self):
        if self._mem is None:
            return "<BlockDevice closed>"
        return "<BlockDevice capacity=%d block_size=%d queues=%d%s>" % (
            self.capacity, self.block_size, self.num_queues,
            " read-only" if self.read_only else "")


############################################################################
# Net ######################################################################
############################################################################

_NET_DRIVER_FEATURES = (
    VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC | VirtioFeature.RING_EVENT_IDX
    | _NET_F_MTU | _NET_F_MAC | _NET_F_MRG_RXBUF | _NET_F_STATUS)
#: The token of a frame too big for a transmit slot (sent as a chain of its own).
_BIG_FRAME = object()
_release_view = memoryview.release
_is = operator.is_


class _NetPair:
    """One RX/TX queue pair of a NetDevice: its buffers and slots, and what its RX side
    handed out or reassembled. Buffer k of either side is slot ``*_heads[k]`` of its queue.
    """

    def __init__(self, index, rx, tx):
        self.index = index
        self.rx = rx
        self.tx = tx
        self.rx_lock = threading.Lock()
        self.tx_lock = threading.Lock()
        self.rx_pool = self.tx_pool = None
        self.rx_view = None        # every receive buffer; a frame is a slice of it
        self.rx_starts = []        # k -> where receive buffer k's frame starts in rx_view
        self.rx_heads = []         # k -> its slot in the RX queue
        self.rx_heads_are_k = False   # rx_heads[k] == k (a fresh queue): no look-up
        self.rx_run = []           # range(count) as a list: a run k..k+n is rx_run[k:k + n]
        self.rx_frames = []        # k -> receive buffer k after the header (a frame is its start)
        self.rx_words = None       # rx_view as u16 words (MRG_RXBUF's num_buffers), or None
        self.rx_step = 0           # a receive buffer's size in u16 words
        self.rx_held = []          # receive buffers whose frames the caller holds (rx_burst)
        self.rx_out = []           # the views of those frames, released with them
        self.tx_heads = []
        self.tx_views = []         # k -> the frame area of transmit buffer k
        self.tx_run = []           # range(count) as a list: a run k..k+n is tx_run[k:k + n]
        self.tx_table = None       # the transmit slots as a _SlotTable: runs posted as batches
        self.tx_given = {}         # id(view) -> k of the buffers tx_alloc gave the caller
        self.tx_given_k = set()    # those k
        self.tx_last = ((), ())    # the last burst's buffers and their k (until one is freed)
        self.tx_idle = []          # buffers for send/send_many: not given out, not in flight
        self.tx_busy = set()       # buffers in flight
        self.tx_lengths = []       # k -> the frame length its descriptor carries now
        self.tx_big = 0            # frames bigger than a buffer in flight (chains of their own)
        self.frames = collections.deque()   # frames copied out (recv, merged buffers)
        self.partial = None      # (buffers still expected, [chunks]) of a merged frame
        self.rx_rewinds = 0      # RX rewinds (reconnects) seen by recv
        self.rx_restart = None   # used index of the new back-end's first RX entry

    def release(self):
        for view in self.rx_out + self.tx_views + self.rx_frames + [self.rx_words, self.rx_view]:
            if view is not None:
                view.release()
        self.rx_out = []
        self.tx_views = []
        self.rx_frames = []
        self.rx_view = self.rx_words = None


class NetDevice(_Device):
    """A virtio-net interface served by a vhost-user back-end (DPDK's vhost PMD, ...).

    Negotiates VERSION_1, MRG_RXBUF (unless ``mrg_rxbuf=False``) and MAC,
    MTU and STATUS when the back-end offers them (they are read from the
    config space, which needs the CONFIG protocol feature). Receive buffers
    are posted at start and reposted as frames are taken; ``send`` and
    ``send_many`` copy frames (without a virtio-net header: one is added)
    to the TX queue, ``recv`` returns one received frame without its header.
    No offloads are negotiated, so frames are plain Ethernet.

    The zero-copy path (DPDK's ``rte_eth_tx_burst``/``rx_burst``): frames
    written in place into ``tx_alloc`` buffers go out with ``tx_burst``;
    ``rx_burst`` hands back views of received frames in guest memory, whose
    buffers are posted again in bulk by ``rx_release`` or the next burst.

    With ``queue_pairs=N`` (N > 1) NET_MQ is acked and N RX/TX pairs run
    (queues 2p and 2p + 1), each enabled with SET_VRING_ENABLE as QEMU does
    for vhost-user: the control queue that would carry
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (spec 5.1.6.5.5) is the VMM's, never the
    back-end's, so CTRL_VQ is not acked. Every call takes ``pair=``; each
    pair has its own locks, so one thread per pair runs without contention.

    Args:
        frontend: a connected front-end for a NET device (features not yet
            acked); the device owns and closes it.
        queue_size: ring size of the RX and TX queues.
        timeout: seconds ``send`` waits for room in a full TX queue.
        mrg_rxbuf: accept MRG_RXBUF when offered (frames may then span
            several receive buffers).
        rx_buffer_size: bytes per receive buffer, header included; by default
            big enough for one whole frame. With MRG_RXBUF it may be smaller.
        reconnect: None (the default), or seconds to wait for a back-end
            that went away to come back (as for ``BlockDevice``). Frames
            queued for transmission that the old back-end had not used are
            sent again (at-least-once: a frame may arrive twice); receive
            buffers are offered afresh.
        queue_pairs: RX/TX pairs to run; more than 1 needs NET_MQ and the MQ
            protocol feature.
        packed: None uses packed rings when the back-end offers RING_PACKED
            (and the front-end was built with ``packed=True``, as ``connect``
            does), True requires them, False never uses them.

    ``queue_size``, ``rx_buffer_size`` and ``queue_pairs`` give the sizes in
    use and ``packed`` the layout; ``mac``, ``mtu`` and ``link_up`` are None
    when the device does not report them.
    """

    _pairs = ()

    def __init__(self, frontend: VhostUserFrontend, queue_size: int = 256, timeout: float = 5.0,
                 mrg_rxbuf: bool = True, rx_buffer_size: Optional[int] = None,
                 memory_size: Optional[int] = None, reconnect: Optional[float] = None,
                 queue_pairs: int = 1, packed: Optional[bool] = None) -> None:
        self._frontend = frontend
        self.timeout = timeout
        self._inside = []
        try:
            self._init_reconnect(reconnect)
            self._setup(queue_size, mrg_rxbuf, rx_buffer_size, memory_size, queue_pairs,
                        packed)
        except BaseException:
            self.close()
            raise

    @classmethod
    def connect(cls, path: _Connection, queue_size: int = 256, timeout: float = 5.0,
                packed: Optional[bool] = None, **kwargs: Any) -> "NetDevice":
        """Connect to the vhost-user-net socket at ``path``, negotiate and start.

        ``path`` may also be a connected socket or a ``BackendClient`` (from
        ``BackendClient.listen`` for a back-end that connects to us); other
        keyword arguments (``reconnect=``, ``queue_pairs=`` ...) go to the
        constructor.
        """
        return cls._connect_device(
            DeviceType.NET, _NET_DRIVER_FEATURES, path, timeout, kwargs.get("reconnect"),
            lambda frontend: cls(frontend, queue_size=queue_size, timeout=timeout,
                                 packed=packed, **kwargs), packed)

    def _setup(self, queue_size, mrg_rxbuf, rx_buffer_size, memory_size, queue_pairs, packed):
        frontend = self._frontend
        _refuse_other_device_type(frontend, DeviceType.NET)
        offered = frontend.features()
        max_sizes = frontend.queue_max_sizes()
        if len(max_sizes) < 2:
            raise FeatureNotNegotiated("virtio-net: wrong device type? the back-end has %d "
                                       "queue(s), RX and TX need 2" % len(max_sizes))
        if not isinstance(queue_pairs, int) or queue_pairs < 1:
            raise ValueError("virtio-net: queue_pairs must be a positive int, not %r"
                             % (queue_pairs,))
        if queue_pairs > 1:
            has_mq, has_proto = offered & _NET_F_MQ, frontend.protocol_features & _P.MQ
            if not has_mq or not has_proto:
                raise FeatureNotNegotiated(
                    "virtio-net: queue_pairs=%d needs NET_MQ and the MQ protocol feature; the "
                    "back-end offers %s" % (queue_pairs, "only NET_MQ" if has_mq else
                                            "only MQ" if has_proto else "neither"),
                    FrontendReq.SET_FEATURES)
            if queue_pairs > len(max_sizes) // 2:
                raise ValueError("virtio-net: queue_pairs=%d, the back-end has %d queue(s)"
                                 % (queue_pairs, len(max_sizes)))
        size = min([queue_size] + max_sizes[:2 * queue_pairs])
        self.packed = _use_packed(offered, packed, size, "virtio-net")
        wanted = _NET_DRIVER_FEATURES if mrg_rxbuf else _NET_DRIVER_FEATURES & ~_NET_F_MRG_RXBUF
        if queue_pairs > 1:
            wanted |= _NET_F_MQ
        if self.packed:
            wanted |= VirtioFeature.RING_PACKED
        self.features = offered & wanted
        frontend.ack_features(self.features)
        self.mac = self.mtu = self.link_up = None
        if self.features & (_NET_F_MAC | _NET_F_MTU | _NET_F_STATUS | _NET_F_MQ):
            try:
                data = frontend.read_config(0, _device_config_size(DeviceType.NET, self.features))
            except FeatureNotNegotiated:
                pass  # no config space (DPDK offers no CONFIG protocol feature)
            else:
                fields = _config_values(DeviceType.NET, self.features, data)
                self.mac = fields.get("mac")
                self.mtu = fields.get("mtu")
                if "status" in fields:
                    self.link_up = bool(fields["status"] & _NET_S_LINK_UP)
                pairs = fields.get("max_virtqueue_pairs")
                if pairs is not None and queue_pairs > pairs:
                    raise ValueError("virtio-net: queue_pairs=%d, the device's "
                                     "max_virtqueue_pairs is %d" % (queue_pairs, pairs))
        self._mrg = bool(self.features & _NET_F_MRG_RXBUF)
        # The header has num_buffers with VERSION_1 or MRG_RXBUF (spec 5.1.6).
        self._hdr_len = _NET_HDR.size if self.features & (
            VirtioFeature.VERSION_1 | _NET_F_MRG_RXBUF) else _NET_HDR_LEGACY_SIZE
        self._tx_hdr = bytes(self._hdr_len)
        frame_max = max(self.mtu or 0, 1500) + _ETH_HLEN + 4
        if rx_buffer_size is None:
            rx_buffer_size = self._hdr_len + frame_max
        if rx_buffer_size < self._hdr_len + (1 if self._mrg else frame_max):
            raise ValueError("virtio-net: rx_buffer_size %d cannot hold %s"
                             % (rx_buffer_size, "the header" if self._mrg else
                                "a %d-byte frame and its header (MRG_RXBUF is off)"
                                % frame_max))
        self._rx_size = self.rx_buffer_size = rx_buffer_size
        self.queue_size = size
        self.queue_pairs = queue_pairs
        if memory_size is None:
            memory_size = queue_pairs * 2 * size * (rx_buffer_size + self._hdr_len
                                                    + frame_max) + (1 << 20)
        self._mem = GuestMemory([(0, memory_size)], name="vhost-user-net")
        self._tx_size = self._hdr_len + frame_max
        queues = []
        pairs = []
        for pair in range(queue_pairs):
            for index in (2 * pair + _NET_RX, 2 * pair + _NET_TX):
                queues.append(Queue(self._mem, size, index, features=self.features,
                                    lock=threading.RLock()))
                self._queues = queues
            pairs.append(self._setup_pair(pair, queues[-2], queues[-1]))
        frontend.activate(self._mem, None, queues)
        self._pairs = pairs
        for pair in pairs:
            pair.rx.notify()

    def _setup_pair(self, index, rx, tx):
        """A pair's buffers and slots: posted receive buffers, idle transmit buffers."""
        size, rx_size, tx_size, hdr_len = (self.queue_size, self._rx_size, self._tx_size,
                                           self._hdr_len)
        mem = self._mem
        pair = _NetPair(index, rx, tx)
        # Calls only before sleeping: a back-end that polls (DPDK) then never
        # signals one while the driver is busy taking what it used.
        rx.defer_calls = tx.defer_calls = True
        # Receive buffer k is posted once here and reposted (in bulk) as its
        # frame is taken or released.
        pair.rx_pool = mem.allocate(size * rx_size, align=64)
        pair.rx_view = mem.view(pair.rx_pool, size * rx_size)
        pair.rx_starts = [k * rx_size for k in range(size)]
        pair.rx_frames = [pair.rx_view[start + hdr_len:start + rx_size]
                          for start in pair.rx_starts]
        if not rx_size & 1:   # num_buffers of a run of buffers in one strided read
            pair.rx_words = pair.rx_view.cast("H")
            pair.rx_step = rx_size // 2
        pair.rx_run = list(range(size))
        pair.rx_heads = [rx.add_slot(writable=[(pair.rx_pool + k * rx_size, rx_size)])
                         for k in range(size)]
        pair.rx_heads_are_k = pair.rx_heads == pair.rx_run
        rx.post_slots(pair.rx_heads, pair.rx_run)
        # Transmit buffer k: its virtio-net header, written once here (no
        # offloads: all zero), then the frame; a post sets only the length.
        # One descriptor stays out of the slots, for a frame bigger than the MTU.
        count = max(1, size - 1)
        pair.tx_pool = mem.allocate(count * tx_size)
        pool = mem.view(pair.tx_pool, count * tx_size)
        try:
            pool[:] = bytes(len(pool))
            pair.tx_views = [pool[k * tx_size + hdr_len:(k + 1) * tx_size] for k in range(count)]
        finally:
            pool.release()
        pair.tx_heads = [tx.add_slot([(pair.tx_pool + k * tx_size, tx_size)])
                         for k in range(count)]
        pair.tx_table = _SlotTable(tx, pair.tx_heads)
        pair.tx_run = pair.tx_table.run
        pair.tx_lengths = [None] * count
        pair.tx_idle = list(range(count - 1, -1, -1))   # a stack: buffer 0 first
        return pair

    def _pair(self, pair, what="send"):
        pairs = self._pairs
        if not pairs:
            raise DeviceClosed("%s: the device was closed" % what)
        if pair.__class__ is not int or not 0 <= pair < len(pairs):
            raise ValueError("%s: pair %r: the device runs pairs 0..%d"
                             % (what, pair, len(pairs) - 1))
        return pairs[pair]

    @property
    def frame_max(self) -> int:
        """The longest frame a transmit buffer (``tx_alloc``) or receive buffer holds."""
        return self._tx_size - self._hdr_len

    # -- frames by copy ------------------------------------------------------------

    def send(self, frame: _Buffer, pair: int = 0) -> None:
        """Queue one Ethernet frame for transmission (copied; no header needed)."""
        self.send_many((frame,), pair)

    def send_many(self, frames: Iterable[_Buffer], pair: int = 0) -> None:
        """Queue frames for transmission with one kick; waits while the TX ring is full.

        Each frame is copied once, into a transmit buffer behind its header;
        the buffers are posted together, as ``tx_burst`` posts them.
        """
        pair = self._pair(pair)
        with pair.tx_lock, self._call("send"):
            deadline = time.monotonic() + self.timeout
            # Every call: frames queued to a back-end that is gone would be lost.
            deadline += self._check_alive("send")
            tx = pair.tx
            hdr_len, frame_max = self._hdr_len, self.frame_max
            idle, views = pair.tx_idle, pair.tx_views
            taken, lengths = [], []
            for frame in frames:
                frame = memoryview(frame).cast("B")
                length = len(frame)
                if not _ETH_HLEN <= length <= 0xFFFF - hdr_len:
                    raise ValueError("send: frame of %d bytes is not in %d..%d"
                                     % (length, _ETH_HLEN, 0xFFFF - hdr_len))
                if length > frame_max:   # bigger than the MTU: a chain of its own
                    self._tx_post(pair, taken, lengths)
                    taken, lengths = [], []
                    deadline = self._wait_tx(pair, lambda: tx.num_free, deadline)
                    tx.add((self._tx_hdr + bytes(frame),), token=_BIG_FRAME)
                    pair.tx_big += 1
                    continue
                if not idle:
                    self._tx_post(pair, taken, lengths)
                    taken, lengths = [], []
                    deadline = self._wait_tx(pair, lambda: idle, deadline)
                k = idle.pop()
                views[k][:length] = frame
                taken.append(k)
                lengths.append(length)
            self._tx_post(pair, taken, lengths)
            tx.notify()   # what a big frame alone left to announce
            self._tx_reclaim(pair)  # free what the device already sent

    # -- frames in place: zero-copy bursts (DPDK's rx/tx_burst over mbufs) ------------

    def tx_alloc(self, count: int = 1, pair: int = 0) -> List[memoryview]:
        """``count`` transmit buffers of ``pair``, each ``frame_max`` bytes of guest memory.

        Write a frame at the start of each (no virtio-net header: each buffer
        has its own, written once) and post them with ``tx_burst``, as often
        as you like: a buffer keeps its bytes, and ``tx_burst`` waits for a
        buffer still in flight from an earlier burst. ``tx_free`` gives them
        back; ``close`` releases them (a later access raises ValueError).

        Raises:
            ValueError: more buffers than the pair has left to give.
            VhostUserTimeout: the back-end kept them in flight past the timeout.
        """
        pair = self._pair(pair, "tx_alloc")
        if count.__class__ is not int or count < 1:
            raise ValueError("tx_alloc: count must be a positive int, got %r" % (count,))
        with pair.tx_lock, self._call("tx_alloc"):
            available = len(pair.tx_views) - len(pair.tx_given)
            if count > available:
                raise ValueError("tx_alloc: %d buffers asked, pair %d has %d not given out"
                                 % (count, pair.index, available))
            deadline = time.monotonic() + self.timeout
            idle = pair.tx_idle
            if len(idle) < count:
                self._wait_tx(pair, lambda: len(idle) >= count, deadline)
            taken = idle[-count:]
            del idle[-count:]
            taken.reverse()   # in buffer order: a later burst of them is a run
            views = pair.tx_views
            for k in taken:
                pair.tx_given[id(views[k])] = k
            pair.tx_given_k.update(taken)
            return [views[k] for k in taken]

    def tx_free(self, buffers: Iterable[memoryview], pair: int = 0) -> None:
        """Give buffers from ``tx_alloc`` back (a frame still in flight is sent first)."""
        pair = self._pair(pair, "tx_free")
        with pair.tx_lock:
            taken = self._tx_buffers(pair, buffers, "tx_free")
            pair.tx_last = ((), ())
            for buffer, k in zip(buffers, taken):
                del pair.tx_given[id(buffer)]
                pair.tx_given_k.discard(k)
                if k not in pair.tx_busy:
                    pair.tx_idle.append(k)

    def tx_burst(self, buffers: Sequence[memoryview], lengths: Sequence[int],
                 pair: int = 0) -> None:
        """Post ``lengths[i]`` bytes of each ``tx_alloc`` buffer as a frame, with one kick.

        Nothing is copied. The buffers belong to the device until it has
        sent them: do not write to them before ``tx_burst`` returns for
        them again. A buffer still in flight from an earlier burst is waited
        for (up to the timeout). The kick is skipped when the device does
        not want one (VRING_USED_F_NO_NOTIFY, EVENT_IDX).

        Raises:
            ValueError: a buffer not from this pair's ``tx_alloc``, listed
                twice, or a length outside 14..``frame_max``; nothing was posted.
            VhostUserTimeout: a buffer stayed in flight past the timeout.
        """
        pairs = self._pairs
        if pair.__class__ is not int or not 0 <= pair < len(pairs):
            pair = self._pair(pair, "tx_burst")   # raises
        else:
            pair = pairs[pair]
        if lengths.__class__ is not list:
            lengths = list(lengths)
        count = len(lengths)
        inside = self._inside
        inside.append(None)    # _call() spelled out: this is the fast path
        try:
            if self._trouble():
                self._check_alive("tx_burst")
            with pair.tx_lock:
                last = pair.tx_last
                if len(buffers) == len(last[0]) and all(map(_is, buffers, last[0])):
                    taken = last[1]   # the buffers of the last burst again: no look-up
                else:
                    try:
                        taken = list(map(pair.tx_given.__getitem__, map(id, buffers)))
                    except KeyError:
                        taken = self._tx_buffers(pair, buffers, "tx_burst")   # raises
                    pair.tx_last = (list(buffers), taken)
                if len(taken) != count:
                    raise ValueError("tx_burst: %d buffers and %d lengths"
                                     % (len(taken), count))
                if not count:
                    return
                if _smallest(lengths) < _ETH_HLEN \
                        or _largest(lengths) > self._tx_size - self._hdr_len:
                    self._tx_bad_length(lengths)
                busy = pair.tx_busy
                if busy:
                    self._tx_reclaim(pair)
                    # (isdisjoint looks up every item of a list, even in an empty set)
                    if busy and not busy.isdisjoint(taken):
                        self._wait_tx(pair, lambda: busy.isdisjoint(taken),
                                      time.monotonic() + self.timeout)
                self._tx_post(pair, taken, lengths)
        except (ValueError, OSError) as exc:
            self._closed_error("tx_burst", exc)
            raise
        finally:
            inside.pop()

    def _tx_buffers(self, pair, buffers, what):
        """The buffer numbers of ``buffers``; ValueError naming the first foreign one."""
        taken = []
        for i, buffer in enumerate(buffers):
            k = pair.tx_given.get(id(buffer))
            if k is None or pair.tx_views[k] is not buffer:
                raise ValueError("%s: buffers[%d] is not a buffer from pair %d's tx_alloc() "
                                 "(or it was freed)" % (what, i, pair.index))
            taken.append(k)
        return taken

    def _tx_bad_length(self, lengths):
        for i, length in enumerate(lengths):
            if length.__class__ is not int or not _ETH_HLEN <= length <= self.frame_max:
                raise ValueError("tx_burst: lengths[%d] is %r, a frame is %d..%d bytes"
                                 % (i, length, _ETH_HLEN, self.frame_max))

    def _tx_post(self, pair, taken, lengths):
        """Post transmit buffers ``taken`` (idle, distinct) with frames of ``lengths`` bytes."""
        count = len(taken)
        if not count:
            return
        busy = pair.tx_busy
        before = len(busy)
        busy.update(taken)
        if len(busy) != before + count:
            busy.difference_update(taken)
            raise ValueError("tx_burst: a buffer is listed twice")
        tx = pair.tx
        first = taken[0]
        run = taken == pair.tx_run[first:first + count]
        heads = pair.tx_heads
        heads = heads[first:first + count] if run else [heads[k] for k in taken]
        try:
            with tx.lock:
                tx.check_usable()
                # A descriptor's length changes only with its frame's: the same
                # frames posted again write nothing but the avail ring.
                known = pair.tx_lengths
                if (known[first:first + count] if run else [known[k] for k in taken]) \
                        != lengths:
                    # New lengths are looked at closely once, not at every post.
                    if not all(length.__class__ is int for length in lengths):
                        self._tx_bad_length(lengths)
                    tx.set_slot_lengths(heads, list(map(self._hdr_len.__add__, lengths)))
                    if run:
                        known[first:first + count] = lengths
                    else:
                        for k, length in zip(taken, lengths):
                            known[k] = length
                batch = None
                if run:   # a run of buffers: a batch, reaped whole when sent whole
                    batch = pair.tx_table.batches.get((first, count), False)
                    if batch is False:
                        batch = _SlotBatch.make(pair.tx_table, first, count)
                if batch is not None:
                    kick = tx.post_batch(batch, True)
                else:
                    tx.post_run(heads, taken)
                    kick = tx.kick_due()
        except BaseException:
            busy.difference_update(taken)
            raise
        if kick:
            tx.kick.signal()

    def _tx_reclaim(self, pair, used=None):
        """Account used TX entries (reaped now unless given): their buffers are free again."""
        if used is None:
            tx = pair.tx
            with tx.lock:
                batch, used = tx.reap_batch()
                if batch is None:
                    tokens = tx.reap_run()[0]
                else:
                    tokens = batch.run + [token for token, _ in used] if used else batch.run
        else:
            tokens = [token for token, _ in used]
        if not tokens:
            return
        if pair.tx_big:
            big = tokens.count(_BIG_FRAME)
            if big:
                pair.tx_big -= big
                tokens = [k for k in tokens if k is not _BIG_FRAME]
        busy = pair.tx_busy
        if len(busy) == len(tokens):   # all in flight came back (tokens are some of busy)
            busy.clear()
        else:
            busy.difference_update(tokens)
        given = pair.tx_given_k
        if not given or given.isdisjoint(tokens):
            pair.tx_idle.extend(tokens)
        elif not given.issuperset(tokens):   # the caller's stay the caller's
            pair.tx_idle.extend([k for k in tokens if k not in given])

    def _wait_tx(self, pair, room, deadline):
        """Kick and reap until ``room()`` holds; VhostUserTimeout at ``deadline``.

        Returns the deadline, moved by any outage waited through (reconnect=).
        """
        tx = pair.tx
        self._tx_reclaim(pair)
        # Each wait for room gets the full timeout: a long send_many that keeps
        # the ring moving is not "full for timeout" (it once timed out overall).
        deadline = max(deadline, time.monotonic() + self.timeout)
        while not room():
            tx.notify()
            deadline += self._check_alive("send")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VhostUserTimeout("send: the TX queue stayed full for %.1f s"
                                       % self.timeout)
            self._tx_reclaim(pair, tx.wait_used(min(remaining, _CRASH_CHECK_INTERVAL)))
        return deadline

    def flush(self, timeout: Optional[float] = None, pair: Optional[int] = None) -> None:
        """Wait until the back-end has taken every frame queued for transmission.

        ``pair`` None waits for every pair.

        Raises:
            VhostUserTimeout: frames are still queued after ``timeout``
                (default the device's).
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        pairs = self._pairs if pair is None else (self._pair(pair, "flush"),)
        if not pairs:
            raise DeviceClosed("flush: the device was closed")
        for one in pairs:
            with one.tx_lock, self._call("flush"):
                deadline += self._check_alive("flush")
                tx = one.tx
                self._tx_reclaim(one)
                while tx.in_flight:
                    deadline += self._check_alive("flush")
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise VhostUserTimeout("flush: the back-end has not taken %d frame(s) "
                                               "of pair %d within %g s"
                                               % (tx.in_flight, one.index, timeout))
                    self._tx_reclaim(one, tx.wait_used(min(remaining, _CRASH_CHECK_INTERVAL),
                                                       count=tx.in_flight))

    def recv(self, timeout: Optional[float] = None, pair: int = 0) -> Optional[bytes]:
        """The next frame received on ``pair`` without its virtio-net header; None on timeout.

        ``timeout`` defaults to the device's; 0 polls. The frame is a copy,
        and its receive buffer is posted again at once.
        """
        pair = self._pair(pair, "recv")
        with pair.rx_lock, self._call("recv"):
            if pair.rx_held:
                self._rx_repost(pair)
            if not pair.frames:
                taken, lengths = self._rx_take(pair, None, timeout, "recv")
                self._rx_copy(pair, taken, lengths)
                if not pair.frames:
                    return None
            return pair.frames.popleft()

    def rx_burst(self, max_frames: int = 32, timeout: Optional[float] = None,
                 pair: int = 0) -> List[memoryview]:
        """Up to ``max_frames`` frames received on ``pair``, as views of guest memory.

        Each view is one frame without its virtio-net header, in the receive
        buffer the back-end wrote it to: nothing is copied. The views stay
        valid until ``rx_release`` or the next ``rx_burst``/``recv`` on the
        pair, which release them (a later access raises ValueError) and post
        their buffers again in bulk; keep ``bytes(view)`` to keep a frame.
        Waits up to ``timeout`` (default the device's; 0 polls) for the
        first frame; an empty list when none came.

        Raises:
            ProtocolError: a used entry that names a buffer not in flight,
                claims more than the buffer holds or less than the header;
                the queue is then broken.
        """
        pairs = self._pairs
        if pair.__class__ is not int or not 0 <= pair < len(pairs):
            pair = self._pair(pair, "rx_burst")   # raises
        else:
            pair = pairs[pair]
        if max_frames.__class__ is not int or max_frames < 1:
            raise ValueError("rx_burst: max_frames must be a positive int, got %r"
                             % (max_frames,))
        inside = self._inside
        inside.append(None)    # _call() spelled out: this is the fast path
        try:
            if self._closing:
                raise DeviceClosed("rx_burst: the device was closed")
            with pair.rx_lock:
                if pair.rx_held:
                    self._rx_repost(pair)
                if not pair.frames:
                    taken, lengths = self._rx_take(pair, max_frames, timeout, "rx_burst")
                    if not taken:
                        return []
                    rx = pair.rx
                    hdr_len = self._hdr_len
                    count, first = len(taken), taken[0]
                    run = taken == pair.rx_run[first:first + count]   # buffers k..k+n
                    if pair.partial is None and rx.rewinds == pair.rx_rewinds \
                            and _smallest(lengths) >= hdr_len \
                            and (not self._mrg or self._single_buffers(pair, taken, run)):
                        # The usual burst: each buffer a whole frame, handed out in place.
                        buffers = pair.rx_frames
                        if run:
                            frames = [buffer[:length - hdr_len] for buffer, length
                                      in zip(buffers[first:first + count], lengths)]
                        else:
                            frames = [buffers[k][:length - hdr_len]
                                      for k, length in zip(taken, lengths)]
                        pair.rx_held = taken
                        pair.rx_out = frames
                        return frames
                    self._rx_copy(pair, taken, lengths)   # names a bad one
                else:
                    pair.rx.check_usable()   # frames copied out before a bad entry stay
                frames = []
                while pair.frames and len(frames) < max_frames:
                    frames.append(memoryview(pair.frames.popleft()))
                return frames
        except (ValueError, OSError) as exc:
            self._closed_error("rx_burst", exc)
            raise
        finally:
            inside.pop()

    def rx_release(self, pair: int = 0) -> None:
        """Give back the frames of the last ``rx_burst`` on ``pair``: their buffers are posted again."""
        pair = self._pair(pair, "rx_release")
        with pair.rx_lock, self._call("rx_release"):
            self._rx_repost(pair)

    @staticmethod
    def _single_buffers(pair, taken, run):
        """With MRG_RXBUF: whether every header says its frame is in that one buffer.

        ``run``: ``taken`` are buffers k..k+n.
        """
        # num_buffers is the header's last u16 (spec 5.1.6).
        words, count = pair.rx_words, len(taken)
        if words is not None and not _RING_WORDS_VIA_STRUCT:   # PyPy: tolist is slow
            step = pair.rx_step
            if run:   # one strided read
                at = taken[0] * step + 5
                return words[at:at + step * count:step].tolist().count(1) == count
            return [words[k * step + 5] for k in taken].count(1) == count
        unpack_from, view, starts = _RING_WORD_STRUCTS["H"].unpack_from, pair.rx_view, \
            pair.rx_starts
        for k in taken:
            if unpack_from(view, starts[k] + 10)[0] != 1:
                return False
        return True

    def _rx_take(self, pair, limit, timeout, what):
        """Reap up to ``limit`` used receive buffers, waiting up to ``timeout`` for one."""
        rx = pair.rx
        if timeout == 0 or not _TRACING_JIT and rx.has_used():
            # Nothing to wait for. (Under PyPy the wait comes first: see _SPIN_RUN.)
            with rx.lock:
                return rx.reap_run(limit)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            # Wait, then reap, as BlockDevice.reap does (and for PyPy's sake).
            if self._trouble():
                deadline += self._check_alive(what)
            remaining = deadline - time.monotonic()
            if remaining > 0:
                rx.wait_for_used(min(remaining, _CRASH_CHECK_INTERVAL))
            with rx.lock:
                taken, lengths = rx.reap_run(limit)
            if taken or remaining <= 0:
                return taken, lengths

    def _rx_post(self, pair, taken):
        """Post receive buffers ``taken`` again, in one batch, with a kick if wanted."""
        if not taken:
            return
        rx = pair.rx
        heads = taken if pair.rx_heads_are_k else [pair.rx_heads[k] for k in taken]
        with rx.lock:
            rx.check_usable()
            rx.post_run(heads, taken)
            kick = rx.kick_due()
        if kick:
            rx.kick.signal()

    def _rx_repost(self, pair):
        """Release the frames ``rx_burst`` handed out and post their buffers again."""
        frames, pair.rx_out = pair.rx_out, []
        held, pair.rx_held = pair.rx_held, []
        kept = []
        try:
            list(map(_release_view, frames))
        except BufferError:
            for k, frame in zip(held, frames):
                try:
                    frame.release()
                except BufferError:   # exported (e.g. to numpy): not the device's again yet
                    kept.append((k, frame))
        if kept:
            pair.rx_held = [k for k, _ in kept]
            pair.rx_out = [frame for _, frame in kept]
            held = [k for k in held if k not in pair.rx_held]
        self._rx_post(pair, held)

    def _rx_copy(self, pair, taken, lengths):
        """Copy used receive buffers' frames out (merged ones joined), then repost them."""
        rx = pair.rx
        # Used entries are numbered by the used index (split) or, one
        # descriptor per receive buffer, by ring position (packed).
        span = rx.size if rx.packed else 0x10000
        if rx.rewinds != pair.rx_rewinds:
            # Reconnected: the new back-end's first used entry is at the
            # used index the ring was rewound to (see _cut_partial_frame).
            pair.rx_rewinds = rx.rewinds
            pair.rx_restart = rx.vring_base & (span - 1)
        try:
            first = (rx.next_used - len(taken)) % span
            for i, (k, length) in enumerate(zip(taken, lengths)):
                if (first + i) % span == pair.rx_restart:
                    self._cut_partial_frame(pair)
                self._take(pair, pair.rx_pool + pair.rx_starts[k], length)
        finally:
            # Every used buffer goes back, in one batch, even after a bad one
            # (not to a queue that one broke: its error is the one to see).
            if rx.broken is None:
                self._rx_post(pair, taken)

    @staticmethod
    def _cut_partial_frame(pair):
        """Drop a merged frame the old back-end had not finished when it went away."""
        pair.rx_restart = None
        if pair.partial is not None:
            _log.warning("virtio-net: dropped a received frame the back-end had not finished "
                         "(%d of its buffers missing) when it went away", pair.partial[0])
            pair.partial = None

    def _take(self, pair, gpa, length):
        """Account one used receive buffer: a whole frame or part of a merged one."""
        mem = self._mem
        if pair.partial is None:
            if length < self._hdr_len:
                pair.rx.fail("virtio-net: a received buffer holds %d bytes, less than the "
                             "%d-byte header" % (length, self._hdr_len))
            count = 1
            if self._mrg:
                count = _NET_HDR.unpack(mem.read(gpa, _NET_HDR.size))[6]
                if not 1 <= count <= pair.rx.size:
                    pair.rx.fail("virtio-net: num_buffers %d in a received header is not "
                                 "in 1..%d" % (count, pair.rx.size))
            chunks = [mem.read(gpa + self._hdr_len, length - self._hdr_len)]
        else:
            count, chunks = pair.partial
            chunks.append(mem.read(gpa, length))
        count -= 1
        if count:
            pair.partial = (count, chunks)
        else:
            pair.partial = None
            pair.frames.append(b"".join(chunks))

    def _release_buffers(self):
        for pair in self._pairs:
            pair.release()

    def close(self) -> None:
        """Disconnect from the back-end and free guest memory; safe to call twice.

        Views from ``rx_burst`` and buffers from ``tx_alloc`` are released
        (a later access raises ValueError).
        """
        _Device.close(self)
        self._pairs = ()

    def __repr__(self):
        if self._mem is None:
            return "<NetDevice closed>"
        return "<NetDevice mac=%s mtu=%s%s%s pairs=%d>" % (
            self.mac.hex() if self.mac else None, self.mtu,
            " mrg_rxbuf" if self._mrg else "", " packed" if self.packed else "",
            self.queue_pairs)


############################################################################
# virtio-fs ################################################################
############################################################################

# FUSE over a request queue (virtio spec 5.11); the FUSE layouts are in Wire format.
# A request is one chain: driver-readable fuse_in_header + arguments (+ data),
# then device-writable fuse_out_header + reply. Queue 0 is the hiprio queue
# (FORGET, BATCH_FORGET: no reply); queues 1.. are request queues.

#: Bytes one READDIR(PLUS) reply may hold, and the longest symlink target (PATH_MAX).
_FS_DIR_BUFFER = 32 << 10
_FS_PATH_MAX = 4096
_FS_XATTR_MAX = 65536      # XATTR_SIZE_MAX and XATTR_LIST_MAX
#: Symlinks followed while resolving one path before ELOOP (Linux's MAXSYMLINKS).
_FS_MAX_SYMLINKS = 40
#: Name lookups kept cached; the oldest beyond this are forgotten.
_FS_CACHE_ENTRIES = 4096
#: Chunks of one large read or write kept in flight together.
_FS_MAX_IN_FLIGHT = 16
_FS_DRIVER_FEATURES = (VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC
                       | VirtioFeature.RING_EVENT_IDX)
_FS_HIPRIO = 0
_O_ACCMODE = getattr(os, "O_ACCMODE", 3)    # PyPy's os lacks the name


def _fs_error(err, filename=None, filename2=None):
    """The OSError subclass ``os`` raises for ``err`` (FileNotFoundError, ...)."""
    return OSError(err, os.strerror(err), filename, None, filename2) if filename2 is not None \
        else OSError(err, os.strerror(err), filename)


def _process_umask():
    """This process's umask, without changing it (/proc, Linux 4.7+), else set and restore."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _stat_result(attr):
    """os.stat_result from a decoded fuse_attr (st_dev 0: the share has no device here)."""
    (ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, nlink,
     uid, gid, rdev, blksize, _flags) = attr
    # Times are u64 on the wire but time_t (signed) in the server.
    atime, mtime, ctime = [t - (1 << 64) if t >= 1 << 63 else t for t in (atime, mtime, ctime)]
    named = {"st_atime": atime + atimensec * 1e-9, "st_mtime": mtime + mtimensec * 1e-9,
             "st_ctime": ctime + ctimensec * 1e-9, "st_blksize": blksize, "st_blocks": blocks,
             "st_rdev": rdev}
    # The fields past the first ten go by name, and 3.13 refuses unknown ones:
    # PyPy keeps the nanoseconds as nsec_atime... and derives st_atime_ns.
    if hasattr(os.stat_result, "nsec_atime"):
        named.update(nsec_atime=atimensec, nsec_mtime=mtimensec, nsec_ctime=ctimensec)
    else:
        named.update(st_atime_ns=atime * 10**9 + atimensec,
                     st_mtime_ns=mtime * 10**9 + mtimensec,
                     st_ctime_ns=ctime * 10**9 + ctimensec)
    return os.stat_result((mode, ino, 0, nlink, uid, gid, size, atime, mtime, ctime), named)


def _valid_until(seconds, nsec):
    return time.monotonic() + seconds + nsec * 1e-9


class _FuseRequest:
    """One FUSE request in flight (what ``_Completions`` marks done)."""

    __slots__ = ("op", "unique", "out", "reply", "done", "written", "background", "queue",
                 "cell")

    def __init__(self, op, unique, reply, queue):
        self.cell = None            # no guest-memory header cell (BlockDevice's requests have one)
        self.op = op
        self.unique = unique
        self.out = bytearray(_FUSE_OUT_HEADER.size)
        self.reply = reply          # the writable reply buffer (or None)
        self.done = False
        self.written = None
        self.background = False
        self.queue = queue


class _FsNode:
    """A node id we hold lookups on: its attributes and how many lookups to FORGET."""

    __slots__ = ("nodeid", "nlookup", "attr", "attr_expiry", "users", "changed")

    def __init__(self, nodeid, attr, expiry):
        self.nodeid = nodeid
        self.nlookup = 0
        self.attr = attr
        self.attr_expiry = expiry
        self.users = 0              # cached names and open files pointing at it
        self.changed = 0            # FsDevice._epoch of its last change (_mark_stale)

    @property
    def mode(self):
        # The root is looked up by nobody: a directory until GETATTR says more.
        return self.attr[9] if self.attr is not None else 0o040000


class _FsDirEntry:
    """One ``FsDevice.scandir`` entry, shaped like ``os.DirEntry``."""

    def __init__(self, fs, directory, name, ino, dtype, attr):
        self.name = name
        self.path = _fs_join(directory, name)
        self._fs = fs
        self._ino = ino
        self._dtype = dtype
        self._lstat = _stat_result(attr) if attr is not None else None
        self._stat = None

    def inode(self):
        return self._ino

    def _type(self, follow_symlinks):
        if follow_symlinks and self.is_symlink():
            try:
                return self.stat().st_mode & 0o170000
            except OSError:
                return None
        if self._lstat is not None:
            return self._lstat.st_mode & 0o170000
        return self._dtype << 12 if self._dtype else self.stat(follow_symlinks=False).st_mode \
            & 0o170000

    def is_dir(self, follow_symlinks=True):
        return self._type(follow_symlinks) == 0o040000

    def is_file(self, follow_symlinks=True):
        return self._type(follow_symlinks) == 0o100000

    def is_symlink(self):
        if self._lstat is not None:
            return self._lstat.st_mode & 0o170000 == 0o120000
        if self._dtype:
            return self._dtype == 10       # DT_LNK
        return self.stat(follow_symlinks=False).st_mode & 0o170000 == 0o120000

    def stat(self, follow_symlinks=True):
        if not follow_symlinks or not self.is_symlink():
            if self._lstat is None:
                self._lstat = self._fs.lstat(self.path)
            if not follow_symlinks or self._lstat.st_mode & 0o170000 != 0o120000:
                return self._lstat
        if self._stat is None:
            self._stat = self._fs.stat(self.path)
        return self._stat

    def __fspath__(self):
        return self.path

    def __repr__(self):
        return "<FsDirEntry %r>" % self.name


class _FsScandirIterator:
    """What ``FsDevice.scandir`` returns: an iterator that is also a context manager."""

    def __init__(self, entries):
        self._entries = iter(entries)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._entries)

    def close(self):
        self._entries = iter(())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _byte_view(data):
    """A flat memoryview of unsigned bytes on ``data``, cast only when it is not one.

    The chunks of large reads and writes are slices of it, and on PyPy 7.3
    slicing a cast view copies byte by byte, far slower than a byte view.
    """
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _fs_join(directory, name):
    if isinstance(name, bytes):
        return directory + name if not directory or directory.endswith(b"/") \
            else directory + b"/" + name
    return directory + name if not directory or directory.endswith("/") \
        else directory + "/" + name


class _FuseFile(io.RawIOBase):
    """An open FUSE file: the raw layer ``FsDevice.open`` puts buffering over."""

    _fs = None

    def __init__(self, fs, node, fh, flags, name, mode, append):
        io.RawIOBase.__init__(self)
        self._fs = fs
        self._node = node
        self._fh = fh
        self._flags = flags
        self.name = name
        self.mode = mode
        self._append = append
        self._pos = 0
        self._readable = flags & _O_ACCMODE in (os.O_RDONLY, os.O_RDWR)
        self._writable = flags & _O_ACCMODE in (os.O_WRONLY, os.O_RDWR)

    def _device(self):
        if self.closed:
            raise ValueError("I/O operation on closed file")
        fs = self._fs
        if fs is None or fs._mem is None:
            raise DeviceClosed("%s: the device was closed" % self.name)
        return fs

    def readable(self):
        self._device()
        return self._readable

    def writable(self):
        self._device()
        return self._writable

    def seekable(self):
        self._device()
        return True

    def fileno(self):
        raise io.UnsupportedOperation("%s is a FUSE file on a virtio-fs device; it has no "
                                      "OS file descriptor" % self.name)

    def isatty(self):
        self._device()
        return False

    def readinto(self, buffer):
        fs = self._device()
        if not self._readable:
            raise io.UnsupportedOperation("File not open for reading")
        view = _byte_view(buffer)
        count = fs._read_into(self._node, self._fh, self._pos, view, self.name)
        self._pos += count
        return count

    def readall(self):
        fs = self._device()
        if not self._readable:
            raise io.UnsupportedOperation("File not open for reading")
        # What the size says is left in one go, then more until a read is empty.
        size = fs._getattr(self._node, self._fh, self.name)[1] - self._pos
        chunks = []
        while True:
            buffer = bytearray(size if size > 0 else fs.max_read)
            count = fs._read_into(self._node, self._fh, self._pos, memoryview(buffer), self.name)
            self._pos += count
            if not count:
                return b"".join(chunks)
            chunks.append(buffer if count == len(buffer) else buffer[:count])
            size = 0

    def write(self, data):
        fs = self._device()
        if not self._writable:
            raise io.UnsupportedOperation("File not open for writing")
        view = _byte_view(data)
        if self._append:
            self._pos = fs._getattr(self._node, self._fh, self.name)[1]
        count = fs._write_from(self._node, self._fh, self._pos, view, self.name)
        self._pos += count
        return count

    def seek(self, offset, whence=io.SEEK_SET):
        fs = self._device()
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._pos + offset
        elif whence == io.SEEK_END:
            position = fs._getattr(self._node, self._fh, self.name)[1] + offset
        else:
            raise ValueError("invalid whence (%r, should be 0, 1 or 2)" % (whence,))
        if position < 0:
            raise _fs_error(errno.EINVAL, self.name)
        self._pos = position
        return position

    def tell(self):
        self._device()
        return self._pos

    def truncate(self, size=None):
        fs = self._device()
        if not self._writable:
            raise io.UnsupportedOperation("File not open for writing")
        size = self._pos if size is None else size
        fs._setattr(self._node, self.name, _FATTR_SIZE | _FATTR_FH, size=size, fh=self._fh)
        return size

    def flush(self):
        """FUSE_FLUSH: the server's close-time work (the kernel sends it on every close)."""
        if self.closed or self._fs is None or self._fs._mem is None:
            return
        self._fs._flush(self._node, self._fh, self.name)

    def fsync(self, datasync=False):
        """FUSE_FSYNC: have the server sync the file to its storage."""
        self._device()._fsync(self._node, self._fh, datasync, self.name)

    def close(self):
        """FUSE_FLUSH then FUSE_RELEASE; safe to call twice."""
        if self.closed:
            return
        try:
            io.RawIOBase.close(self)     # calls flush() first
        finally:
            fs, self._fs = self._fs, None
            if fs is not None:
                fs._release(self._node, self._fh, self._flags, self.name, self)

    def __del__(self):
        # A file dropped without close() is released at the device's next
        # request: a finalizer may run while this thread holds a queue lock.
        fs, self._fs = self._fs, None
        if fs is not None and not self.closed:
            fs._release_later(self._node, self._fh, self._flags)
        try:
            io.RawIOBase.close(self)
        except Exception:
            pass

    def __repr__(self):
        return "<FuseFile name=%r mode=%r fh=%d%s>" % (
            self.name, self.mode, self._fh, " closed" if self.closed else "")


def _open_flags(mode):
    """(os flags, text, raw mode) for an ``open()`` mode, checked as ``open()`` checks it.

    The raw mode is what ``FileIO.mode`` reports for the same mode ('w+' is 'rb+').
    """
    modes = set(mode) if isinstance(mode, str) else None
    if modes is None or modes - set("axrwb+t") or len(mode) > len(modes):
        raise ValueError("invalid mode: %r" % (mode,))
    creating, reading, writing, appending = ("x" in modes, "r" in modes, "w" in modes,
                                             "a" in modes)
    updating = "+" in modes
    if "t" in modes and "b" in modes:
        raise ValueError("can't have text and binary mode at once")
    if creating + reading + writing + appending != 1:
        raise ValueError("must have exactly one of create/read/write/append mode")
    flags = (os.O_CREAT | os.O_EXCL if creating else os.O_CREAT | os.O_TRUNC if writing
             else os.O_CREAT | os.O_APPEND if appending else 0)
    if updating:
        flags |= os.O_RDWR
    else:
        flags |= os.O_RDONLY if reading else os.O_WRONLY
    raw = ("xb" if creating else "ab" if appending else
           "rb" if reading or updating else "wb") + ("+" if updating else "")
    return flags, "b" not in modes, raw


def _operation(method):
    """Mark an ``FsDevice`` call: no node is forgotten until every call in progress ends."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self._closed_to_caller():
            raise DeviceClosed("%s: the device was closed" % method.__name__)
        with self._cache_lock:
            self._active += 1
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            # A call that close() on another thread cut short says so, not
            # EBADF or EIO, which would read as errors of the file system.
            if self._closed_to_caller():
                raise DeviceClosed("%s: the device was closed" % method.__name__) \
                    from exc
            raise
        finally:
            with self._cache_lock:
                self._active -= 1
            self._forget_retired()
    return call


#: A name ``FsDevice`` returns: str, or bytes for a bytes path (as ``os`` does).
_Name = Union[str, bytes]


class FsDevice(_Device):
    """A virtio-fs share served by a vhost-user back-end (virtiofsd), used like ``os``.

    Speaks FUSE over the request queue, as a guest kernel's virtio-fs driver
    does, so a Python program lists, reads and writes the shared directory
    with no VM and no mount. Paths are relative to the share's root ('/' and
    '' are the root, '..' stops there, absolute symlink targets resolve from
    the root). Methods mirror ``os`` and ``open()`` and raise the ``OSError``
    subclass ``os`` would for the daemon's errno, with ``filename`` set; a
    malformed FUSE reply raises ``ProtocolError`` for that request only.

    Name lookups are cached for the entry and attribute timeouts the daemon
    gives, and forgotten (FORGET / BATCH_FORGET on the hiprio queue) when
    they leave the cache or the device closes. Large reads and writes are
    split at ``max_read``/``max_write`` and kept in flight together; each
    request is its own chain, so any number of threads may share a device.

    Args:
        frontend: a connected front-end for an FS device (features not yet
            acked); the device owns and closes it.
        queue_size: ring size, capped by the back-end's maximum.
        timeout: seconds to wait for any reply.
        memory_size: bytes of guest memory for rings and request buffers.
        umask: applied to the modes of files and directories created, as
            the kernel does; default this process's umask.

    Attributes:
        tag, num_request_queues: from the config space, or None when the
            back-end offers no CONFIG (virtiofsd: QEMU supplies them).
        minor, init_flags, max_write, max_readahead, max_pages: what the
            daemon answered to FUSE_INIT.
        max_read: the largest FUSE_READ sent.
    """

    #: ``move_to`` refuses: the FUSE session (node ids, file handles) lives in the daemon.
    _movable = False

    def __init__(self, frontend: VhostUserFrontend, queue_size: int = 128, timeout: float = 5.0,
                 memory_size: int = 32 << 20, umask: Optional[int] = None) -> None:
        self._frontend = frontend
        self.timeout = timeout
        self.umask = _process_umask() if umask is None else umask
        self._unique = 0
        self._unique_lock = threading.Lock()
        self._cache_lock = threading.RLock()
        self._epoch = 0     # counts changes (see _mark_stale)
        self._hiprio_lock = threading.Lock()
        self._nodes = {}                              # nodeid -> _FsNode
        self._names = collections.OrderedDict()       # (parent, name) -> (nodeid, expiry)
        self._files = weakref.WeakSet()               # open _FuseFile objects
        self._buffered = weakref.WeakSet()            # what open() returned over them
        self._deferred = collections.deque()          # releases of files dropped unclosed
        self._active = 0                              # calls in progress (see _operation)
        self._closer = None  # type: Optional[int]    # the thread in close(), once called
        self._retired = []                            # (nodeid, nlookup) to FORGET
        self._ids = (os.geteuid(), os.getegid(), os.getpid())
        try:
            self._setup(queue_size, memory_size)
        except BaseException:
            self.close()
            raise

    @classmethod
    def connect(cls, path: _Connection, timeout: float = 5.0,
                **kwargs: Any) -> "FsDevice":
        """Connect to the vhost-user-fs socket at ``path``, negotiate, FUSE_INIT.

        ``path`` may also be a connected socket or a ``BackendClient``; other
        keyword arguments go to the constructor.
        """
        frontend = VhostUserFrontend(DeviceType.FS, _FS_DRIVER_FEATURES, path, timeout=timeout)
        return cls(frontend, timeout=timeout, **kwargs)

    def _setup(self, queue_size, memory_size):
        frontend = self._frontend
        _refuse_other_device_type(frontend, DeviceType.FS)
        offered = frontend.features()
        if not offered & VirtioFeature.VERSION_1:
            # libvhost-user refuses legacy devices (BACKENDS.md 5, gotcha 5).
            raise FeatureNotNegotiated("virtio-fs: the back-end does not offer VERSION_1")
        self.features = offered & _FS_DRIVER_FEATURES
        frontend.ack_features(self.features)
        self.tag = self.num_request_queues = None
        if frontend.protocol_features & _P.CONFIG:
            data = frontend.read_config(0, _device_config_size(DeviceType.FS, self.features))
            fields = _config_values(DeviceType.FS, self.features, data)
            self.tag = fields["tag"].split(b"\0", 1)[0].decode("utf-8", "replace")
            self.num_request_queues = fields["num_request_queues"]
        max_sizes = frontend.queue_max_sizes()
        if len(max_sizes) < 2:
            raise FeatureNotNegotiated("virtio-fs: wrong device type? the back-end has %d "
                                       "queue(s); hiprio and a request queue need 2"
                                       % len(max_sizes))
        size = min(queue_size, *max_sizes)
        self.queue_size = size
        self._mem = GuestMemory([(0, memory_size)], name="vhost-user-fs")
        queues = []
        for index in range(len(max_sizes)):
            queues.append(Queue(self._mem, size, index, features=self.features,
                                lock=threading.RLock()))   # shared with _Completions
            self._queues = queues
        self._hiprio = queues[_FS_HIPRIO]
        self._completions = [_Completions(q, self) for q in queues[1:]]
        frontend.activate(self._mem, None, queues)
        self._init()

    def _init(self):
        """FUSE_INIT: protocol 7.31, offering what the calls below use."""
        reply = bytearray(_FUSE_INIT_OUT.size)
        length = self._fuse_call(_FuseOp.INIT, 0, [_FUSE_INIT_IN.pack(
            _FUSE_MAJOR, _FUSE_MINOR, 1 << 17, _FUSE_INIT_FLAGS)], reply, expect=24)
        fields = _FUSE_INIT_OUT.unpack(bytes(reply[:length]).ljust(_FUSE_INIT_OUT.size, b"\0"))
        (major, minor, max_readahead, flags, _background, _congestion, max_write, _gran,
         max_pages, _align, _flags2) = fields
        if major != _FUSE_MAJOR or minor < _FUSE_MINOR:
            raise FeatureNotNegotiated("FUSE_INIT: the daemon speaks FUSE %d.%d; %d.%d or "
                                       "newer is needed" % (major, minor, _FUSE_MAJOR,
                                                            _FUSE_MINOR))
        if max_write < 4096:
            raise ProtocolError("FUSE_INIT: max_write %d is below one page" % max_write)
        self.major, self.minor = major, minor
        self.init_flags = flags
        # Only what was offered counts, whatever else the daemon sets.
        self._flags = flags & _FUSE_INIT_FLAGS
        self.max_readahead = max_readahead
        self.max_write = max_write
        self.max_pages = max_pages if self._flags & _FUSE_MAX_PAGES else 32
        self.max_read = min(max_write, max(self.max_pages, 1) * 4096)

    # -- requests ----------------------------------------------------------------

    def _closed_to_caller(self):
        """True when the device is closed, or being closed by another thread than this one."""
        return self._mem is None or self._closer not in (None, threading.get_ident())

    def _check_open(self, what="FUSE"):
        if self._closed_to_caller():
            raise DeviceClosed("%s: the device was closed" % what)

    def _submit(self, op, nodeid, readable, reply):
        """Post one FUSE request (no kick); ``reply`` is a writable buffer or None."""
        self._check_open(_FuseOp(op).name)
        with self._unique_lock:
            self._unique += 1
            unique = self._unique
        completions = self._completions[threading.get_ident() % len(self._completions)]
        length = _FUSE_IN_HEADER.size + sum(len(part) for part in readable)
        uid, gid, pid = self._ids
        header = _FUSE_IN_HEADER.pack(length, op, unique, nodeid, uid, gid, pid, 0, 0)
        request = _FuseRequest(op, unique, reply, completions)
        # The header and small arguments travel in one descriptor; bulk data
        # (a WRITE's payload) in its own, without a copy into the header.
        small = [header]
        bulk = []
        for part in readable:
            (bulk if len(part) > 256 or bulk else small).append(part)
        readable = [b"".join(small)] + bulk
        writable = [request.out] if reply is None or not len(reply) else [request.out, reply]
        _add_when_room(completions, readable, writable, request, self.timeout,
                       _FuseOp(op).name)
        return request

    def _wait(self, requests, what):
        """Kick and wait until every request of ``requests`` (one queue) is done."""
        if not requests:
            return
        completions = requests[0].queue
        completions.queue.notify()
        deadline = time.monotonic() + self.timeout
        completions.wait(lambda: all(r.done for r in requests), deadline, what)

    def _result(self, request, expect=0, filename=None, filename2=None):
        """Validate a completed request's reply: its payload length, or raise its errno."""
        name = _FuseOp(request.op).name
        written = request.written
        if written < _FUSE_OUT_HEADER.size:
            raise ProtocolError("FUSE %s: the device wrote %d byte(s), less than the %d-byte "
                                "fuse_out_header" % (name, written, _FUSE_OUT_HEADER.size))
        length, error, unique = _FUSE_OUT_HEADER.unpack(request.out)
        if unique != request.unique:
            raise ProtocolError("FUSE %s: reply unique %d, the request was %d"
                                % (name, unique, request.unique))
        if length != written:
            raise ProtocolError("FUSE %s: fuse_out_header len %d disagrees with the used "
                                "length %d" % (name, length, written))
        if error:
            if not -_FUSE_ERRNO_MAX <= error < 0:
                raise ProtocolError("FUSE %s: error %d is not a negative errno"
                                    % (name, error))
            if length != _FUSE_OUT_HEADER.size:
                raise ProtocolError("FUSE %s: an error reply (%d) carries %d byte(s) of "
                                    "payload" % (name, error, length - _FUSE_OUT_HEADER.size))
            raise _fs_error(-error, filename, filename2)
        payload = length - _FUSE_OUT_HEADER.size
        if payload < expect:
            raise ProtocolError("FUSE %s: reply of %d byte(s), its out-struct needs %d"
                                % (name, payload, expect))
        return payload

    def _fuse_call(self, op, nodeid, readable=(), reply=None, expect=0, filename=None,
              filename2=None):
        """One FUSE request and its reply: the reply's payload length."""
        self._run_deferred()
        if isinstance(reply, int):
            reply = bytearray(reply)
        request = self._submit(op, nodeid, readable, reply)
        self._wait([request], _FuseOp(op).name)
        return self._result(request, expect, filename, filename2)

    def _call_many(self, calls, what, filename):
        """Several requests in flight together: their payload lengths, in order.

        Every request is waited for before any error is raised, so no reply
        lands in a buffer after the call returned (unless the wait timed out:
        then the device is not answering at all).
        """
        requests = []
        try:
            for op, nodeid, readable, reply in calls:
                requests.append(self._submit(op, nodeid, readable, reply))
        finally:
            self._wait(requests, what)
        return [self._result(r, filename=filename) for r in requests]

    def _forget(self, pairs):
        """FORGET or BATCH_FORGET on the hiprio queue: no reply (spec 5.11.6, as Linux)."""
        if not pairs or self._mem is None:
            return
        with self._hiprio_lock:
            queue = self._hiprio
            uid, gid, pid = self._ids
            for start in range(0, len(pairs), 256):
                batch = pairs[start:start + 256]
                if len(batch) == 1:
                    op, body = _FuseOp.FORGET, _FUSE_U64.pack(batch[0][1])
                    nodeid = batch[0][0]
                else:
                    op, nodeid = _FuseOp.BATCH_FORGET, 0
                    body = _FUSE_U32_PAIR.pack(len(batch), 0) + b"".join(
                        _FUSE_FORGET_ONE.pack(n, count) for n, count in batch)
                with self._unique_lock:
                    self._unique += 1
                    unique = self._unique
                header = _FUSE_IN_HEADER.pack(_FUSE_IN_HEADER.size + len(body), op, unique,
                                              nodeid, uid, gid, pid, 0, 0)
                deadline = time.monotonic() + self.timeout
                while True:
                    queue.get_used()
                    try:
                        queue.add([header + body])
                        break
                    except Queue.Full:
                        queue.notify()
                        self._check_alive(op.name)
                        if time.monotonic() > deadline:
                            raise VhostUserTimeout("FUSE %s: the hiprio queue stayed full for "
                                                   "%g s" % (op.name, self.timeout))
                        queue.wait_used(_CRASH_CHECK_INTERVAL)
            queue.notify()

    # -- the node cache ----------------------------------------------------------

    def _entry(self, parent, name, payload, offset=0, epoch=None):
        """Account a fuse_entry_out (one lookup reference): its _FsNode, cached as ``name``.

        ``epoch``: ``self._epoch`` when the request was sent; if the node (or,
        for the name, its directory) changed since, what the reply says is
        kept but not trusted: the next call asks again (see ``_mark_stale``).
        """
        fields = _FUSE_ENTRY_OUT.unpack_from(payload, offset)
        nodeid, _gen, entry_valid, attr_valid, entry_nsec, attr_nsec = fields
        attr = _FUSE_ATTR.unpack_from(payload, offset + _FUSE_ENTRY_OUT.size)
        if nodeid == 0 or nodeid == _FUSE_ROOT_ID and name is not None:
            raise ProtocolError("FUSE LOOKUP: node id %d for %r" % (nodeid, name))
        with self._cache_lock:
            node = self._nodes.get(nodeid)
            if node is None:
                node = self._nodes[nodeid] = _FsNode(nodeid, attr, 0)
            node.nlookup += 1
            node.attr = attr
            node.attr_expiry = _valid_until(attr_valid, attr_nsec) \
                if epoch is None or node.changed <= epoch else 0
            if name is not None:
                key = (parent, name)
                old = self._names.pop(key, None)
                # A rename, unlink or create in the directory since the request
                # may have moved the name.
                directory = self._nodes.get(parent)
                trusted = epoch is None or directory is None or directory.changed <= epoch
                self._names[key] = (nodeid, _valid_until(entry_valid, entry_nsec)
                                    if trusted else 0)
                node.users += 1
                if old is not None:
                    self._unuse(old[0])
                while len(self._names) > _FS_CACHE_ENTRIES:
                    _, (oldest, _) = self._names.popitem(last=False)
                    self._unuse(oldest)
            else:
                node.users += 1
        self._forget_retired()
        return node

    def _unuse(self, nodeid):
        """Drop one use of ``nodeid``; retire it when nothing uses it (cache lock held)."""
        node = self._nodes.get(nodeid)
        if node is None:
            return
        node.users -= 1
        if node.users <= 0:
            del self._nodes[nodeid]
            self._retired.append((nodeid, node.nlookup))

    def _forget_retired(self):
        """FORGET the retired nodes once no call is between its lookups and its requests.

        A node that leaves the cache may be about to be used by a call on
        another thread that looked it up a moment ago; the daemon must not
        drop it before that call's requests are sent (the kernel holds an
        inode reference for as long). Under a load that never pauses they go
        anyway once as many as the cache holds are waiting: the daemon keeps an
        open fd per node it remembers.
        """
        with self._cache_lock:
            if not self._retired or self._active and len(self._retired) < _FS_CACHE_ENTRIES:
                return
            pairs, self._retired = self._retired, []
        self._forget(pairs)

    def _drop_name(self, parent, name):
        """Forget the cached ``name`` after it changed; its node's and the parent's
        attributes (nlink, ctime, mtime) are stale now too."""
        with self._cache_lock:
            self._epoch += 1
            old = self._names.pop((parent, name), None)
            for nodeid in (parent, old[0] if old is not None else None):
                node = self._nodes.get(nodeid)
                if node is not None:
                    node.attr_expiry = 0
                    node.changed = self._epoch
            if old is not None:
                self._unuse(old[0])
        self._forget_retired()

    def _lookup(self, parent, name, filename):
        """The node ``name`` in directory ``parent``: cached, else FUSE_LOOKUP."""
        key = (parent, name)
        with self._cache_lock:
            cached = self._names.get(key)
            if cached is not None and cached[1] > time.monotonic():
                self._names.move_to_end(key)     # least recently used leaves first
                return self._nodes[cached[0]]
        if len(name) > 255:
            raise _fs_error(errno.ENAMETOOLONG, filename)
        reply = bytearray(_ENTRY_SIZE)
        epoch = self._epoch
        self._fuse_call(_FuseOp.LOOKUP, parent, [name + b"\0"], reply, _ENTRY_SIZE, filename)
        return self._entry(parent, name, reply, epoch=epoch)

    def _root(self):
        with self._cache_lock:
            node = self._nodes.get(_FUSE_ROOT_ID)
            if node is None:
                node = self._nodes[_FUSE_ROOT_ID] = _FsNode(_FUSE_ROOT_ID, None, 0)
                node.users = 1 << 62          # never forgotten: the kernel never does
        return node

    @staticmethod
    def _fuse_string(value):
        """``value`` (str, bytes or path-like) as the bytes a FUSE request carries, without
        the terminating NUL; a NUL inside raises ValueError, as ``os`` does (every name,
        target and attribute name goes through here, so none is cut short)."""
        raw = os.fsencode(os.fspath(value))
        if b"\0" in raw:
            raise ValueError("embedded null byte")
        return raw

    @staticmethod
    def _parts(path):
        """(components as bytes, trailing slash) of a share-relative path."""
        raw = FsDevice._fuse_string(path)
        return raw.split(b"/"), raw.endswith(b"/")

    def _walk_path(self, path, follow_last=True, parent_only=False, ancestors=None):
        """Resolve ``path``: its node, or with ``parent_only`` (parent node, last name).

        Symlinks in the middle are followed always, the last one when
        ``follow_last``; '..' never climbs above the root. ``ancestors``, a
        list, receives the node ids from the root down to the result.
        """
        parts, trailing = self._parts(path)
        last_name = None
        if parent_only:
            while parts and parts[-1] == b"":
                parts.pop()
            last_name = parts.pop() if parts else b""
        pending = collections.deque(parts)
        stack = [self._root()]
        links = 0
        while pending:
            name = pending.popleft()
            if name in (b"", b"."):
                continue
            if name == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            parent = stack[-1]
            if parent.attr is not None and parent.mode & 0o170000 != 0o040000:
                raise _fs_error(errno.ENOTDIR, path)
            node = self._lookup(parent.nodeid, name, path)
            is_last = not pending and not parent_only and not trailing
            if node.mode & 0o170000 == 0o120000 and (follow_last or not is_last):
                links += 1
                if links > _FS_MAX_SYMLINKS:
                    raise _fs_error(errno.ELOOP, path)
                target = self._readlink_node(node, path)
                if target.startswith(b"/"):
                    stack = [stack[0]]
                pending.extendleft(reversed(target.split(b"/")))
                continue
            stack.append(node)
        node = stack[-1]
        if (trailing or parent_only) and node.attr is not None \
                and node.mode & 0o170000 != 0o040000:
            raise _fs_error(errno.ENOTDIR, path)
        if ancestors is not None:
            ancestors.extend(n.nodeid for n in stack)
        if parent_only:
            return node, last_name
        return node

    def _parent(self, path, special_errno, ancestors=None):
        """(parent node, name) for a call that creates or removes ``name``.

        ``special_errno`` is what ``os`` says when the name is the root, '.'
        or '..' (EEXIST for mkdir, EBUSY for rmdir, ...). An empty path names
        nothing to create or remove: ENOENT, as ``os.mkdir("")`` says.
        """
        if not self._fuse_string(path):
            raise _fs_error(errno.ENOENT, path)
        parent, name = self._walk_path(path, parent_only=True, ancestors=ancestors)
        if name in (b"", b".", b".."):
            if isinstance(special_errno, dict):
                special_errno = special_errno[name]
            raise _fs_error(special_errno, path)
        if len(name) > 255:
            raise _fs_error(errno.ENAMETOOLONG, path)
        return parent, name

    def _getattr(self, node, fh=None, filename=None):
        """The node's fuse_attr, fresh from GETATTR unless the cached one is still valid."""
        if fh is None and node.attr is not None and node.attr_expiry > time.monotonic():
            return node.attr
        reply = bytearray(_ATTR_OUT_SIZE)
        epoch = self._epoch
        self._fuse_call(_FuseOp.GETATTR, node.nodeid, [_FUSE_GETATTR_IN.pack(
            _FUSE_GETATTR_FH if fh is not None else 0, 0, fh or 0)], reply, _ATTR_OUT_SIZE,
            filename)
        return self._store_attr(node, reply, epoch)

    def _store_attr(self, node, reply, epoch):
        """Cache a fuse_attr_out, trusted only if the node did not change since ``epoch``."""
        valid, nsec, _ = _FUSE_ATTR_OUT.unpack_from(reply)
        attr = _FUSE_ATTR.unpack_from(reply, _FUSE_ATTR_OUT.size)
        with self._cache_lock:
            node.attr = attr
            node.attr_expiry = _valid_until(valid, nsec) if node.changed <= epoch else 0
        return attr

    def _mark_stale(self, *nodes):
        """These nodes changed: their cached attributes are stale, and so is what any
        reply to a request sent before now says of them (the kernel's attr_version):
        a READDIRPLUS racing a write would otherwise re-cache the old size."""
        with self._cache_lock:
            self._epoch += 1
            for node in nodes:
                node.attr_expiry = 0
                node.changed = self._epoch

    def _setattr(self, node, filename, valid, mode=0, size=0, fh=0, atime=(0, 0),
                 mtime=(0, 0), uid=0, gid=0):
        body = _FUSE_SETATTR_IN.pack(valid, 0, fh, size, 0, atime[0], mtime[0], 0, atime[1],
                                     mtime[1], 0, mode, 0, uid, gid, 0)
        reply = bytearray(_ATTR_OUT_SIZE)
        self._mark_stale(node)
        epoch = self._epoch
        self._fuse_call(_FuseOp.SETATTR, node.nodeid, [body], reply, _ATTR_OUT_SIZE, filename)
        return self._store_attr(node, reply, epoch)

    def _readlink_node(self, node, filename):
        if node.mode & 0o170000 != 0o120000:
            raise _fs_error(errno.EINVAL, filename)
        reply = bytearray(_FS_PATH_MAX)
        length = self._fuse_call(_FuseOp.READLINK, node.nodeid, (), reply, 1, filename)
        return bytes(reply[:length])

    def _result_name(self, path, name):
        return os.fsdecode(name) if isinstance(os.fspath(path), str) else name

    # -- os-like calls ------------------------------------------------------------

    @_operation
    def stat(self, path: _Path, follow_symlinks: bool = True) -> os.stat_result:
        """os.stat: an ``os.stat_result`` of ``path`` (st_dev is 0)."""
        node = self._walk_path(path, follow_last=follow_symlinks)
        return _stat_result(self._getattr(node, filename=path))

    def lstat(self, path: _Path) -> os.stat_result:
        """os.lstat: ``stat`` without following a final symlink."""
        return self.stat(path, follow_symlinks=False)

    @_operation
    def exists(self, path: _Path) -> bool:
        """os.path.exists: False for a missing path (or any OSError), as os does."""
        try:
            self.stat(path)
        except OSError:
            return False
        return True

    @_operation
    def access(self, path: _Path, mode: int) -> bool:
        """os.access: FUSE_ACCESS, or the mode bits when the daemon has no ACCESS."""
        try:
            node = self._walk_path(path)
            if mode == os.F_OK:
                return True
            try:
                self._fuse_call(_FuseOp.ACCESS, node.nodeid, [_FUSE_U32_PAIR.pack(mode, 0)],
                           filename=path)
                return True
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
            attr = self._getattr(node, filename=path)
        except OSError:
            return False
        file_mode, uid, gid = attr[9], attr[11], attr[12]
        if os.geteuid() == 0:
            # As the kernel's generic_permission for root: read and write
            # always, execute when anyone may (or a directory).
            return not mode & os.X_OK or bool(file_mode & 0o111) or \
                file_mode & 0o170000 == 0o040000
        shift = 6 if uid == os.geteuid() else 3 if gid in (os.getegid(),) + tuple(
            os.getgroups()) else 0
        return (file_mode >> shift) & mode == mode

    def _read_dir(self, path):
        """(name bytes, ino, d_type, fuse_attr or None) of each entry but '.' and '..'."""
        node = self._walk_path(path)
        if node.attr is not None and node.mode & 0o170000 != 0o040000:
            raise _fs_error(errno.ENOTDIR, path)
        reply = bytearray(_FUSE_OPEN_OUT.size)
        self._fuse_call(_FuseOp.OPENDIR, node.nodeid, [_FUSE_U32_PAIR.pack(os.O_RDONLY, 0)], reply,
                   _FUSE_OPEN_OUT.size, path)
        fh = _FUSE_OPEN_OUT.unpack(reply)[0]
        plus = bool(self._flags & _FUSE_DO_READDIRPLUS)
        op = _FuseOp.READDIRPLUS if plus else _FuseOp.READDIR
        entries = []
        try:
            offset = 0
            buffer = bytearray(_FS_DIR_BUFFER)
            while True:
                epoch = self._epoch
                length = self._fuse_call(op, node.nodeid, [_FUSE_IO_IN.pack(
                    fh, offset, len(buffer), 0, 0, 0, 0)], buffer, filename=path)
                if not length:
                    break
                previous, offset = offset, self._parse_dirents(node, buffer[:length], plus,
                                                               entries, path, epoch)
                if offset == previous:
                    raise ProtocolError("FUSE %s: the reply does not move past offset %d"
                                        % (op.name, offset))
        finally:
            self._fuse_call(_FuseOp.RELEASEDIR, node.nodeid,
                       [_FUSE_RELEASE_IN.pack(fh, os.O_RDONLY, 0, 0)], filename=path)
        return entries

    def _parse_dirents(self, directory, data, plus, entries, path, epoch=None):
        """Decode one READDIR(PLUS) reply into ``entries``; the offset to continue from."""
        pos = 0
        last = None
        what = "READDIRPLUS" if plus else "READDIR"
        while pos < len(data):
            attr = None
            entry_at = pos
            if plus:
                pos += _ENTRY_SIZE
            if pos + _FUSE_DIRENT.size > len(data):
                raise ProtocolError("FUSE %s: a truncated entry at byte %d of %d"
                                    % (what, entry_at, len(data)))
            ino, off, namelen, dtype = _FUSE_DIRENT.unpack_from(data, pos)
            name = bytes(data[pos + _FUSE_DIRENT.size:pos + _FUSE_DIRENT.size + namelen])
            if not 0 < namelen <= 255 or len(name) != namelen or b"/" in name \
                    or b"\0" in name:
                raise ProtocolError("FUSE %s: bad entry name (length %d) at byte %d"
                                    % (what, namelen, pos))
            pos += (_FUSE_DIRENT.size + namelen + 7) & ~7
            last = off
            if name in (b".", b".."):
                continue      # the kernel takes no lookup reference for these
            if plus and _FUSE_ENTRY_OUT.unpack_from(data, entry_at)[0]:
                attr = self._entry(directory.nodeid, name, data, entry_at, epoch).attr
            entries.append((name, ino, dtype, attr))
        if last is None:
            raise ProtocolError("FUSE %s: a reply with no entry" % what)
        return last

    @_operation
    def listdir(self, path: _Path = "") -> List[_Name]:
        """os.listdir: the names in directory ``path``, without '.' and '..'."""
        return [self._result_name(path, name) for name, _, _, _ in self._read_dir(path)]

    @_operation
    def scandir(self, path: _Path = "") -> _FsScandirIterator:
        """os.scandir: an iterator of entries (name, path, is_dir(), stat(), ...)."""
        directory = os.fspath(path)
        entries = [_FsDirEntry(self, directory, self._result_name(path, name), ino, dtype, attr)
                   for name, ino, dtype, attr in self._read_dir(path)]
        return _FsScandirIterator(entries)

    def walk(self, top: _Path = "", topdown: bool = True,
             onerror: Optional[Callable[[OSError], Any]] = None,
             followlinks: bool = False) -> Iterator[Tuple[Any, List[_Name], List[_Name]]]:
        """os.walk over the share: (dirpath, dirnames, filenames) tuples."""
        try:
            entries = list(self.scandir(top))
        except OSError as exc:
            if onerror is not None:
                onerror(exc)
            return
        dirs, files, links = [], [], set()
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            (dirs if is_dir else files).append(entry.name)
            if is_dir and entry.is_symlink():
                links.add(entry.name)
        if topdown:
            yield top, dirs, files
        for name in dirs:
            # As os.walk: a name the caller added is walked into unless it is a symlink.
            if not followlinks and (name in links or name not in links and topdown and
                                    self._is_link(_fs_join(top, name))):
                continue
            for result in self.walk(_fs_join(top, name), topdown, onerror, followlinks):
                yield result
        if not topdown:
            yield top, dirs, files

    def _is_link(self, path):
        try:
            return self.lstat(path).st_mode & 0o170000 == 0o120000
        except OSError:
            return False

    @_operation
    def readlink(self, path: _Path) -> _Name:
        """os.readlink: the target of symlink ``path``."""
        target = self._readlink_node(self._walk_path(path, follow_last=False), path)
        return self._result_name(path, target)

    def _created(self, parent, name, reply):
        """Cache the entry a MKDIR/SYMLINK/LINK/MKNOD/CREATE returned."""
        self._mark_stale(parent)
        return self._entry(parent.nodeid, name, reply)

    @_operation
    def mkdir(self, path: _Path, mode: int = 0o777) -> None:
        """os.mkdir (the umask applies, as the kernel applies it)."""
        parent, name = self._parent(path, errno.EEXIST)
        reply = bytearray(_ENTRY_SIZE)
        self._fuse_call(_FuseOp.MKDIR, parent.nodeid,
                   [_FUSE_MKDIR_IN.pack(mode & ~self.umask & 0o7777, self.umask), name + b"\0"],
                   reply, _ENTRY_SIZE, path)
        self._created(parent, name, reply)

    @_operation
    def makedirs(self, path: _Path, mode: int = 0o777, exist_ok: bool = False) -> None:
        """os.makedirs: create ``path`` and any missing parents."""
        import posixpath
        head, tail = posixpath.split(os.fspath(path))
        if not tail:
            head, tail = posixpath.split(head)
        if head and tail and not self.exists(head):
            try:
                self.makedirs(head, exist_ok=exist_ok)
            except FileExistsError:
                pass       # made meanwhile by someone else
        try:
            self.mkdir(path, mode)
        except OSError:
            # Raise unless asked to ignore an existing directory (os does the same).
            if not exist_ok or not self._is_dir(path):
                raise

    def _is_dir(self, path):
        try:
            return self.stat(path).st_mode & 0o170000 == 0o040000
        except OSError:
            return False

    # The kernel looks a name up before UNLINK, RMDIR or RENAME and checks
    # its type itself (VFS may_delete): virtiofsd answers EIO for a name it
    # cannot find, and leaves the type checks to the kernel.

    @_operation
    def rmdir(self, path: _Path) -> None:
        """os.rmdir."""
        parent, name = self._parent(path, {b"": errno.EBUSY, b".": errno.EINVAL,
                                           b"..": errno.ENOTEMPTY})
        node = self._lookup(parent.nodeid, name, path)
        if node.mode & 0o170000 != 0o040000:
            raise _fs_error(errno.ENOTDIR, path)
        try:
            self._fuse_call(_FuseOp.RMDIR, parent.nodeid, [name + b"\0"], filename=path)
        finally:
            self._drop_name(parent.nodeid, name)

    @_operation
    def remove(self, path: _Path) -> None:
        """os.remove / os.unlink."""
        parent, name = self._parent(path, errno.EISDIR)
        if self._lookup(parent.nodeid, name, path).mode & 0o170000 == 0o040000:
            raise _fs_error(errno.EISDIR, path)
        try:
            self._fuse_call(_FuseOp.UNLINK, parent.nodeid, [name + b"\0"], filename=path)
        finally:
            self._drop_name(parent.nodeid, name)

    unlink = remove

    @_operation
    def rename(self, src: _Path, dst: _Path) -> None:
        """os.rename (which replaces ``dst`` on Linux)."""
        old_parent, old_name = self._parent(src, errno.EBUSY)
        ancestors = []
        new_parent, new_name = self._parent(dst, errno.EBUSY, ancestors)
        node = self._lookup(old_parent.nodeid, old_name, src)
        try:
            target = self._lookup(new_parent.nodeid, new_name, dst)
        except FileNotFoundError:
            target = None
        is_dir = node.mode & 0o170000 == 0o040000
        if target is node:
            return                    # rename(2): the same file, nothing to do
        error = None
        if is_dir and node.nodeid in ancestors:
            error = errno.EINVAL      # a directory into itself
        elif target is not None and is_dir != (target.mode & 0o170000 == 0o040000):
            error = errno.ENOTDIR if is_dir else errno.EISDIR
        if error is not None:
            raise _fs_error(error, src, dst)
        try:
            self._fuse_call(_FuseOp.RENAME, old_parent.nodeid,
                       [_FUSE_U64.pack(new_parent.nodeid), old_name + b"\0", new_name + b"\0"],
                       filename=src, filename2=dst)
        finally:
            self._drop_name(old_parent.nodeid, old_name)
            self._drop_name(new_parent.nodeid, new_name)

    replace = rename

    @_operation
    def symlink(self, target: _Path, path: _Path) -> None:
        """os.symlink: create ``path`` pointing at ``target``."""
        raw_target = self._fuse_string(target)
        parent, name = self._parent(path, errno.EEXIST)
        reply = bytearray(_ENTRY_SIZE)
        self._fuse_call(_FuseOp.SYMLINK, parent.nodeid, [name + b"\0", raw_target + b"\0"], reply,
                   _ENTRY_SIZE, target, path)
        self._created(parent, name, reply)

    @_operation
    def link(self, src: _Path, dst: _Path) -> None:
        """os.link: a hard link ``dst`` to ``src``."""
        node = self._walk_path(src)
        if node.mode & 0o170000 == 0o040000:
            raise _fs_error(errno.EPERM, src, dst)      # vfs_link
        parent, name = self._parent(dst, errno.EEXIST)
        reply = bytearray(_ENTRY_SIZE)
        self._fuse_call(_FuseOp.LINK, parent.nodeid, [_FUSE_U64.pack(node.nodeid), name + b"\0"],
                   reply, _ENTRY_SIZE, src, dst)
        self._created(parent, name, reply)
        self._mark_stale(node)      # nlink changed

    @_operation
    def mkfifo(self, path: _Path, mode: int = 0o666) -> None:
        """os.mkfifo (FUSE_MKNOD)."""
        parent, name = self._parent(path, errno.EEXIST)
        reply = bytearray(_ENTRY_SIZE)
        self._fuse_call(_FuseOp.MKNOD, parent.nodeid,
                   [_FUSE_MKNOD_IN.pack(0o010000 | (mode & ~self.umask & 0o7777), 0,
                                        self.umask, 0), name + b"\0"],
                   reply, _ENTRY_SIZE, path)
        self._created(parent, name, reply)

    @_operation
    def chmod(self, path: _Path, mode: int, follow_symlinks: bool = True) -> None:
        """os.chmod."""
        node = self._walk_path(path, follow_last=follow_symlinks)
        self._setattr(node, path, _FATTR_MODE, mode=mode & 0o7777)

    @_operation
    def chown(self, path: _Path, uid: int, gid: int,
              follow_symlinks: bool = True) -> None:
        """os.chown: -1 leaves the owner or the group as it is."""
        node = self._walk_path(path, follow_last=follow_symlinks)
        valid = (_FATTR_UID if uid != -1 else 0) | (_FATTR_GID if gid != -1 else 0)
        if valid:
            self._setattr(node, path, valid, uid=uid & 0xFFFFFFFF, gid=gid & 0xFFFFFFFF)

    @_operation
    def truncate(self, path: _Path, length: int) -> None:
        """os.truncate: cut or extend file ``path`` to ``length`` bytes."""
        if length < 0:
            raise _fs_error(errno.EINVAL, path)
        node = self._walk_path(path)
        if node.mode & 0o170000 == 0o040000:
            raise _fs_error(errno.EISDIR, path)
        self._setattr(node, path, _FATTR_SIZE, size=length)

    @_operation
    def utime(self, path: _Path, times: Optional[Tuple[float, float]] = None,
              ns: Optional[Tuple[int, int]] = None, follow_symlinks: bool = True) -> None:
        """os.utime: set access and modification times (now when neither is given)."""
        if times is not None and ns is not None:
            raise ValueError("utime: you may specify either 'times' or 'ns' but not both")
        node = self._walk_path(path, follow_last=follow_symlinks)
        if times is None and ns is None:
            self._setattr(node, path, _FATTR_ATIME | _FATTR_MTIME | _FATTR_ATIME_NOW
                          | _FATTR_MTIME_NOW)
            return
        if ns is None:
            ns = tuple(int(round(t * 1e9)) for t in times)
        atime, mtime = [divmod(int(value), 10**9) for value in ns]
        self._setattr(node, path, _FATTR_ATIME | _FATTR_MTIME,
                      atime=(atime[0] & 0xFFFFFFFFFFFFFFFF, atime[1]),
                      mtime=(mtime[0] & 0xFFFFFFFFFFFFFFFF, mtime[1]))

    @_operation
    def statvfs(self, path: _Path = "") -> "os.statvfs_result":
        """os.statvfs of the share (f_favail = f_ffree, f_flag 0)."""
        node = self._walk_path(path)
        reply = bytearray(_FUSE_KSTATFS.size)
        self._fuse_call(_FuseOp.STATFS, node.nodeid, (), reply, _FUSE_KSTATFS.size, path)
        blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, _ = \
            _FUSE_KSTATFS.unpack(reply)
        return os.statvfs_result((bsize, frsize or bsize, blocks, bfree, bavail, files, ffree,
                                  ffree, 0, namelen))

    # -- extended attributes (ENOSYS from the daemon reads as EOPNOTSUPP, as in the kernel)

    def _xattr_call(self, op, node, readable, reply, filename):
        try:
            return self._fuse_call(op, node.nodeid, readable, reply, filename=filename)
        except OSError as exc:
            if exc.errno == errno.ENOSYS:
                raise _fs_error(errno.EOPNOTSUPP, filename)
            raise

    def _xattr_read(self, op, node, name_part, filename):
        size = bytearray(_FUSE_U32_PAIR.size)
        self._xattr_call(op, node, [_FUSE_U32_PAIR.pack(0, 0)] + name_part, size, filename)
        wanted = _FUSE_U32_PAIR.unpack(size)[0]
        if wanted > _FS_XATTR_MAX:
            raise ProtocolError("FUSE %s: size %d is past XATTR_SIZE_MAX" % (op.name, wanted))
        if not wanted:
            return b""
        reply = bytearray(wanted)
        length = self._xattr_call(op, node, [_FUSE_U32_PAIR.pack(wanted, 0)] + name_part,
                                  reply, filename)
        return bytes(reply[:length])

    @_operation
    def getxattr(self, path: _Path, attribute: _Path,
                 follow_symlinks: bool = True) -> bytes:
        """os.getxattr: the value (bytes) of extended attribute ``attribute``."""
        node = self._walk_path(path, follow_last=follow_symlinks)
        return self._xattr_read(_FuseOp.GETXATTR, node, [self._fuse_string(attribute) + b"\0"],
                                path)

    @_operation
    def listxattr(self, path: _Path = "", follow_symlinks: bool = True) -> List[str]:
        """os.listxattr: the names of ``path``'s extended attributes."""
        node = self._walk_path(path, follow_last=follow_symlinks)
        data = self._xattr_read(_FuseOp.LISTXATTR, node, [], path)
        return [os.fsdecode(name) for name in data.split(b"\0") if name]

    @_operation
    def setxattr(self, path: _Path, attribute: _Path, value: _Buffer, flags: int = 0,
                 follow_symlinks: bool = True) -> None:
        """os.setxattr (flags: os.XATTR_CREATE or os.XATTR_REPLACE)."""
        node = self._walk_path(path, follow_last=follow_symlinks)
        value = bytes(value)
        self._xattr_call(_FuseOp.SETXATTR, node, [_FUSE_U32_PAIR.pack(len(value), flags),
                                                  self._fuse_string(attribute) + b"\0", value],
                         None, path)

    @_operation
    def removexattr(self, path: _Path, attribute: _Path,
                    follow_symlinks: bool = True) -> None:
        """os.removexattr."""
        node = self._walk_path(path, follow_last=follow_symlinks)
        self._xattr_call(_FuseOp.REMOVEXATTR, node, [self._fuse_string(attribute) + b"\0"],
                         None, path)

    # -- files --------------------------------------------------------------------

    @_operation
    def open(self, path: _Path, mode: str = "r", buffering: int = -1,
             encoding: Optional[str] = None, errors: Optional[str] = None,
             newline: Optional[str] = None) -> IO[Any]:
        """open(): a file object on ``path`` layered as ``open()`` layers a real file.

        Every mode ``open()`` takes; the raw layer speaks FUSE (READ, WRITE,
        SETATTR for truncate, FLUSH on flush and close, RELEASE on close)
        and has no ``fileno()``.
        """
        flags, text, raw_mode = _open_flags(mode)
        if not text and (encoding is not None or errors is not None or newline is not None):
            raise ValueError("binary mode doesn't take an encoding, errors or newline argument")
        if buffering == 0 and text:
            raise ValueError("can't have unbuffered text I/O")
        if buffering == 1 and not text:
            buffering = -1
        raw = self._open_raw(path, flags, raw_mode)
        try:
            if buffering == 0:
                return raw
            line_buffering = buffering == 1
            if buffering < 0 or buffering == 1:
                blksize = self._getattr(raw._node, filename=path)[14]
                buffering = blksize if blksize > 1 else io.DEFAULT_BUFFER_SIZE
            if raw.readable() and raw.writable():
                buffered = io.BufferedRandom(raw, buffering)
            elif raw.writable():
                buffered = io.BufferedWriter(raw, buffering)
            else:
                buffered = io.BufferedReader(raw, buffering)
            if text:
                buffered = io.TextIOWrapper(buffered, encoding, errors, newline,
                                            line_buffering)
                buffered.mode = mode  # type: ignore[misc]  # writable, as open() sets it
            self._buffered.add(buffered)
            return buffered
        except BaseException:
            raw.close()
            raise

    def _open_raw(self, path, flags, raw_mode):
        parent, name = self._walk_path(path, parent_only=True)
        node = None
        if name in (b"", b".", b".."):
            node = self._walk_path(path)
        else:
            try:
                node = self._lookup(parent.nodeid, name, path)
                if node.mode & 0o170000 == 0o120000:
                    node = self._walk_path(path)
            except FileNotFoundError:
                if not flags & os.O_CREAT:
                    raise
        if node is not None and flags & os.O_CREAT and flags & os.O_EXCL:
            raise _fs_error(errno.EEXIST, path)
        if node is not None and node.mode & 0o170000 == 0o040000:
            raise _fs_error(errno.EISDIR, path)
        # Never sent in OPEN (the kernel strips them too); O_TRUNC only
        # when the daemon handles it atomically (ATOMIC_O_TRUNC).
        wire = flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)
        atomic_trunc = bool(self._flags & _FUSE_ATOMIC_O_TRUNC)
        if not atomic_trunc:
            wire &= ~os.O_TRUNC
        reply = bytearray(_FUSE_OPEN_OUT.size)
        if node is None:
            reply = bytearray(_ENTRY_SIZE + _FUSE_OPEN_OUT.size)
            mode = 0o666 & ~self.umask
            self._fuse_call(_FuseOp.CREATE, parent.nodeid,
                       [_FUSE_CREATE_IN.pack(wire | os.O_CREAT | os.O_EXCL, 0o100000 | mode,
                                             self.umask, 0), name + b"\0"],
                       reply, _ENTRY_SIZE + _FUSE_OPEN_OUT.size, path)
            node = self._entry(parent.nodeid, name, reply)
            fh = _FUSE_OPEN_OUT.unpack_from(reply, _ENTRY_SIZE)[0]
        else:
            self._fuse_call(_FuseOp.OPEN, node.nodeid, [_FUSE_U32_PAIR.pack(wire, 0)], reply,
                       _FUSE_OPEN_OUT.size, path)
            fh = _FUSE_OPEN_OUT.unpack(reply)[0]
        with self._cache_lock:
            node.users += 1
        raw = _FuseFile(self, node, fh, flags, os.fspath(path), raw_mode,
                        bool(flags & os.O_APPEND))
        self._files.add(raw)
        try:
            if flags & os.O_TRUNC and not atomic_trunc:
                raw.truncate(0)
            self._mark_stale(node)
            if flags & os.O_APPEND:
                raw.seek(0, io.SEEK_END)
        except BaseException:
            raw.close()
            raise
        return raw

    @_operation
    def read_bytes(self, path: _Path) -> bytes:
        """The whole content of file ``path`` (pathlib's read_bytes)."""
        with self.open(path, "rb", buffering=0) as f:
            return f.readall()

    @_operation
    def write_bytes(self, path: _Path, data: _Buffer) -> int:
        """Create or replace file ``path`` with ``data``; returns the bytes written."""
        with self.open(path, "wb", buffering=0) as f:
            view = _byte_view(data)
            done = 0
            while done < len(view):
                done += f.write(view[done:])
            return done

    def fsync(self, file: IO[Any]) -> None:
        """os.fsync on a file ``open`` returned: flush its buffers, then FUSE_FSYNC."""
        file.flush()
        raw = file
        while not isinstance(raw, _FuseFile):
            raw = getattr(raw, "buffer", None) or getattr(raw, "raw", None)
            if raw is None:
                raise TypeError("fsync: %r is not a file of this device" % (file,))
        raw.fsync()

    def _read_into(self, node, fh, offset, view, filename):
        """FUSE_READ ``len(view)`` bytes at ``offset``, in chunks kept in flight together."""
        total = 0
        step = self.max_read
        while total < len(view):
            calls = []
            for start in range(total, min(len(view), total + step * _FS_MAX_IN_FLIGHT), step):
                chunk = view[start:start + step]
                calls.append((_FuseOp.READ, node.nodeid, [_FUSE_IO_IN.pack(
                    fh, offset + start, len(chunk), 0, 0, 0, 0)], chunk))
            lengths = self._call_many(calls, "READ", filename)
            for (_, _, _, chunk), length in zip(calls, lengths):
                if length > len(chunk):
                    raise ProtocolError("FUSE READ: %d bytes for a %d-byte read"
                                        % (length, len(chunk)))
                total += length
                if length < len(chunk):
                    return total       # end of file (or a short read): stop there
        return total

    def _write_from(self, node, fh, offset, view, filename):
        """FUSE_WRITE ``view`` at ``offset`` in chunks kept in flight; bytes written."""
        self._mark_stale(node)
        try:
            return self._write_chunks(node, fh, offset, view, filename)
        finally:
            self._mark_stale(node)     # size and mtime moved while the writes ran

    def _write_chunks(self, node, fh, offset, view, filename):
        total = 0
        step = self.max_write
        while total < len(view):
            calls = []
            for start in range(total, min(len(view), total + step * _FS_MAX_IN_FLIGHT), step):
                chunk = view[start:start + step]
                calls.append((_FuseOp.WRITE, node.nodeid, [_FUSE_IO_IN.pack(
                    fh, offset + start, len(chunk), 0, 0, 0, 0), chunk],
                    bytearray(_FUSE_U32_PAIR.size)))
            lengths = self._call_many(calls, "WRITE", filename)
            for (_, _, (_, chunk), reply), length in zip(calls, lengths):
                if length < _FUSE_U32_PAIR.size:
                    raise ProtocolError("FUSE WRITE: reply of %d byte(s), fuse_write_out "
                                        "needs 8" % length)
                size = _FUSE_U32_PAIR.unpack(reply)[0]
                if size > len(chunk):
                    raise ProtocolError("FUSE WRITE: %d bytes written of %d sent"
                                        % (size, len(chunk)))
                total += size
                if size < len(chunk):
                    return total
        return total

    def _flush(self, node, fh, filename):
        try:
            self._fuse_call(_FuseOp.FLUSH, node.nodeid, [_FUSE_RELEASE_IN.pack(fh, 0, 0, 0)],
                       filename=filename)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:      # the kernel then stops sending FLUSH
                raise

    def _fsync(self, node, fh, datasync, filename):
        try:
            self._fuse_call(_FuseOp.FSYNC, node.nodeid, [_FUSE_FSYNC_IN.pack(fh, int(datasync), 0)],
                       filename=filename)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise

    def _release(self, node, fh, flags, filename, raw=None):
        """FUSE_RELEASE of a closed file, and drop its use of the node."""
        try:
            if self._mem is not None:
                self._fuse_call(_FuseOp.RELEASE, node.nodeid,
                           [_FUSE_RELEASE_IN.pack(fh, flags & ~os.O_CREAT, 0, 0)],
                           filename=filename)
        finally:
            with self._cache_lock:
                if raw is not None:
                    self._files.discard(raw)
                if self._nodes.get(node.nodeid) is node:
                    self._unuse(node.nodeid)
            self._forget_retired()

    def _release_later(self, node, fh, flags):
        if self._mem is not None:
            self._deferred.append((node, fh, flags))

    def _run_deferred(self):
        while self._deferred:
            try:
                node, fh, flags = self._deferred.popleft()
            except IndexError:
                return
            try:
                try:
                    self._flush(node, fh, None)     # what close(2) would have sent first
                finally:
                    self._release(node, fh, flags, None)
            except (OSError, VhostUserError) as exc:
                _log.warning("virtio-fs: RELEASE of a file dropped unclosed failed: %s", exc)

    # -- lifetime ------------------------------------------------------------------

    def close(self) -> None:
        """Close open files, release the share and disconnect; safe to call twice.

        Calls on other threads finish the requests they have in flight; their
        next request, and any later call, raises ``ValueError`` saying the
        device is closed. Open files are closed first (what they buffer is
        written), then every node is forgotten (FORGET) and the session
        ended (DESTROY).
        """
        if self._closer is None:
            self._closer = threading.get_ident()
        deadline = time.monotonic() + self.timeout
        while self._active and self._mem is not None and time.monotonic() < deadline:
            time.sleep(0.001)    # the calls on other threads leave at their next request
        if self._mem is not None and self._frontend is not None:
            try:
                self._shutdown()
            except (OSError, VhostUserError, ValueError) as exc:
                _log.info("virtio-fs: closing without a clean FUSE shutdown: %s", exc)
        _Device.close(self)

    def _shutdown(self):
        self._check_alive("close")
        # Files still open are closed as the interpreter would at exit: what
        # their buffers hold is written first.
        for opened in list(self._buffered) + list(self._files):
            if not opened.closed:
                opened.close()
        self._run_deferred()
        with self._cache_lock:
            pairs = self._retired + [(n.nodeid, n.nlookup) for n in self._nodes.values()
                                     if n.nodeid != _FUSE_ROOT_ID and n.nlookup]
            self._retired = []
            self._nodes.clear()
            self._names.clear()
        self._forget(pairs)
        self._fuse_call(_FuseOp.DESTROY, 0)
        # The hiprio queue's FORGETs are answered without a reply; give the
        # daemon the moment it needs to take them before the rings stop.
        deadline = time.monotonic() + self.timeout
        while self._hiprio.in_flight and time.monotonic() < deadline:
            self._hiprio.wait_used(_CRASH_CHECK_INTERVAL)

    def __repr__(self):
        if self._mem is None:
            return "<FsDevice closed>"
        return "<FsDevice FUSE %d.%d tag=%r max_write=%d queues=%d>" % (
            self.major, self.minor, self.tag, self.max_write, len(self._queues))


############################################################################
# Embedded back-end ########################################################
############################################################################

# The other side of the protocol, small enough to read in one sitting: a
# vhost-user back-end serving a virtio-blk disk (over a file or an anonymous
# memfd) or a virtio-net device that echoes every frame it is sent (the role
# DPDK testpmd plays in io forward mode), so that ``demo`` and ``selftest``
# run on a machine with nothing but Python. It is for demonstrations and
# self-checks, not a production daemon: one front-end at a time, one
# thread, split rings only, I/O done inline. It is built on the Wire format
# (the messages, the split-ring layout, the virtio-blk/net constants), the OS
# primitives (the ring accessor and fences among them), the Channel and
# GuestMemory, never on ``Queue``; the interop tests never use it in place
# of qemu-storage-daemon or testpmd.
#
# Like libvhost-user it drops the connection when a front-end breaks the
# protocol (a ring index out of range, an address outside guest memory, a
# looped chain, legacy virtio, a request it does not know). Unlike
# libvhost-user, which acks 0 and then hangs up (BACKENDS.md), a requested
# ack is answered with 1 first, so the front-end sees the failure.

_EMBEDDED_QUEUE_MAX = MAX_QUEUE_SIZE
#: Protocol features the embedded back-end offers; BACKEND_REQ is accepted
#: (the channel is kept) but nothing is ever sent on it.
_EMBEDDED_PROTOCOL = _P.MQ | _P.REPLY_ACK | _P.BACKEND_REQ | _P.CONFIG
_EMBEDDED_TRANSPORT = (VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC
                       | VirtioFeature.RING_EVENT_IDX | VirtioFeature.PROTOCOL_FEATURES)
_GPA, _UADDR = "guest", "user"


class _Refused(VhostUserError):
    """The front-end broke the protocol, so the embedded back-end drops it (vu_panic)."""


class _MappedMemory:
    """The front-end's memory as SET_MEM_TABLE describes it, mapped from the fds it carries.

    Buffers are handed out as (mmap, offset, length), never as memoryviews,
    so the mappings can always be closed (an exported view would pin them).
    Only files sealed against shrinking are mapped: a front-end that could
    ``ftruncate`` a region under us would make the next access SIGBUS this
    process (GuestMemory seals its memfds for the same reason).
    """

    def __init__(self, regions, fds):
        self._maps = []
        try:
            for region, fd in zip(regions, fds):
                self._maps.append((region, self._map(region, fd)))
            for space in ("guest_phys_addr", "userspace_addr"):
                spans = sorted((getattr(r, space), r.memory_size) for r, _ in self._maps)
                for (a, size), (b, _) in zip(spans, spans[1:]):
                    if b < a + size:
                        raise _Refused("SET_MEM_TABLE: regions at %s %#x and %#x overlap"
                                       % (space, a, b), _F.SET_MEM_TABLE)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _map(region, fd):
        import stat
        st = os.fstat(fd)
        end = region.mmap_offset + region.memory_size
        if not region.memory_size:
            raise _Refused("SET_MEM_TABLE: region at %#x has size 0" % region.guest_phys_addr,
                           _F.SET_MEM_TABLE)
        if not stat.S_ISREG(st.st_mode) or not _file_seals(fd) & _F_SEAL_SHRINK:
            raise _Refused("SET_MEM_TABLE: the fd of region %#x is not a memfd sealed against "
                           "shrinking (F_SEAL_SHRINK); a later truncate would crash this "
                           "back-end" % region.guest_phys_addr, _F.SET_MEM_TABLE)
        if st.st_size < end:
            raise _Refused("SET_MEM_TABLE: region %#x needs %d bytes of its file, which has %d"
                           % (region.guest_phys_addr, end, st.st_size), _F.SET_MEM_TABLE)
        start = region.mmap_offset - region.mmap_offset % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(fd, end - start, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=start)
        return mapped, region.mmap_offset - start

    def locate(self, addr, length, space, what):
        """(mmap, offset) of ``length`` bytes at ``addr`` (a guest or a user address)."""
        for region, (mapped, delta) in self._maps:
            offset = addr - (region.guest_phys_addr if space == _GPA else region.userspace_addr)
            if 0 <= offset and offset + length <= region.memory_size:
                return mapped, delta + offset
        raise _Refused("%s: %s address range %#x + %d is outside guest memory"
                       % (what, space, addr, length))

    def close(self):
        maps, self._maps = self._maps, []
        for _, (mapped, _) in maps:
            try:
                mapped.close()
            except BufferError:
                pass  # a ring view is still alive somewhere: the GC unmaps it


class _DeviceRing:
    """One split ring seen from the device: take chains from avail, give them back in used.

    The layout is the driver's (virtio spec 2.7); indices and used entries
    go through the ``_ring_words`` accessor (OS primitives), one aligned
    access each, with its fences between them.
    """

    def __init__(self, index):
        self.index = index
        self.num = 0
        self.addr = None
        self.last_avail = 0
        self.used_idx = 0
        self.kick = None
        self.call = None
        self.started = False
        self.enabled = False
        self.event_idx = False
        self.indirect = False
        self.log = None        # while logging: log(gpa, length) marks the pages dirty
        self.log_used = True   # False: forget to log used-ring writes (a buggy back-end)
        self._written = {}     # head -> its writable (gpa, length) buffers, while logging
        self._views = ()
        self._fences = _Fences()

    @property
    def ready(self):
        return self.started and self.enabled and bool(self._views)

    def map(self, memory):
        """Find the ring's three parts in ``memory`` (after SET_VRING_ADDR or SET_MEM_TABLE)."""
        self.unmap()
        if self.addr is None or memory is None:
            return
        desc_bytes, avail_bytes, used_bytes = _split_ring_sizes(self.num)
        what = "ring %d" % self.index
        for name, addr, align in (("descriptor table", self.addr.desc, 16),
                                  ("avail ring", self.addr.avail, 2),
                                  ("used ring", self.addr.used, 4)):
            if addr % align:  # spec 2.7: 16, 2 and 4
                raise _Refused("SET_VRING_ADDR: %s %s at %#x is not %d-byte aligned"
                               % (what, name, addr, align), _F.SET_VRING_ADDR)
        desc = memory.locate(self.addr.desc, desc_bytes, _UADDR, what)
        avail_map, avail_offset = memory.locate(self.addr.avail, avail_bytes, _UADDR, what)
        mapped, offset = memory.locate(self.addr.used, used_bytes, _UADDR, what)
        self._desc = desc
        # avail: [0] flags, [1] idx, [2 + i] ring[i], [2 + num] used_event
        self._avail = self._words(avail_map, avail_offset, avail_bytes, "H")[0]
        # used: [0] flags, [1] idx, then (id, len) pairs, then avail_event
        self._used_load, self._used_store = self._words(mapped, offset, 4, "H")
        self._elem_store = self._words(mapped, offset + 4, 8 * self.num, "I")[1]
        self._avail_event_store = self._words(mapped, offset + 4 + 8 * self.num, 2, "H")[1]
        # libvhost-user does the same: the used index lives in guest memory.
        self.used_idx = self._used_load(1)

    def _words(self, mapped, offset, length, fmt):
        """(load, store) of the ``fmt`` words at ``offset``: the module's ring accessor."""
        whole = memoryview(mapped)
        view = whole[offset:offset + length]
        load, store, words = _ring_words(view, fmt)
        self._views += (words, view, whole) if words is not view else (view, whole)
        return load, store

    def unmap(self):
        for view in self._views:
            view.release()
        self._views = ()

    def close(self):
        """Stop the ring and close its fds (session end)."""
        self.unmap()
        for fd in (self.kick, self.call):
            if fd is not None:
                os.close(fd)
        self.kick = self.call = None
        self.started = False

    def pop(self, memory):
        """(head, readable, writable) of the next available chain, or None.

        readable and writable are lists of (mmap, offset, length).
        """
        avail_idx = self._avail(1)
        pending = (avail_idx - self.last_avail) & 0xFFFF
        if not pending:
            return None
        if pending > self.num:
            raise _Refused("ring %d: avail index moved from %d to %d, more than the %d entries "
                           "of the ring" % (self.index, self.last_avail, avail_idx, self.num))
        self._fences.read()  # avail->idx before the entry and its descriptors (spec 2.7.13)
        head = self._avail(2 + self.last_avail % self.num)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        readable, writable = self._walk(memory, head)
        return head, readable, writable

    def _walk(self, memory, head):
        what = "ring %d chain at descriptor %d" % (self.index, head)
        readable, writable = [], []
        if self.log is not None:
            self._written[head] = written = []
        table, table_offset, table_size = self._desc[0], self._desc[1], self.num
        index, seen, indirect = head, 0, False
        while True:
            if index >= table_size:
                raise _Refused("%s: descriptor index %d is outside a table of %d"
                               % (what, index, table_size))
            seen += 1
            if seen > table_size:
                raise _Refused("%s: looped descriptor chain" % what)
            addr, length, flags, nxt = _DESC.unpack_from(table, table_offset + 16 * index)
            if flags & _DESC_F_INDIRECT:
                # Spec 2.7.5.3: never nested, never with NEXT, but it may end a
                # chain of direct descriptors, which a device must handle.
                problem = ("RING_INDIRECT_DESC was not negotiated" if not self.indirect else
                           "an indirect table inside an indirect table" if indirect else
                           "an indirect descriptor with NEXT set" if flags & _DESC_F_NEXT else
                           "an indirect table of %d bytes, not a multiple of 16" % length
                           if not length or length % 16 else None)
                if problem:
                    raise _Refused("%s: %s" % (what, problem))
                table, table_offset = memory.locate(addr, length, _GPA, what)
                table_size, index, seen, indirect = length // 16, 0, 0, True
                continue
            mapped, offset = memory.locate(addr, length, _GPA, what)
            if flags & _DESC_F_WRITE:
                writable.append((mapped, offset, length))
                if self.log is not None:
                    written.append((addr, length))
            elif writable:  # spec 2.7.4.2: readable buffers come first
                raise _Refused("%s: a device-readable buffer after a writable one" % what)
            else:
                readable.append((mapped, offset, length))
            if not flags & _DESC_F_NEXT:
                return readable, writable
            index = nxt

    def push(self, head, length):
        """Return a chain in the used ring (published at once); log what it wrote."""
        slot = 2 * (self.used_idx % self.num)
        self._elem_store(slot, head)
        self._elem_store(slot + 1, length)
        self._fences.write()  # the element before the index that covers it
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used_store(1, self.used_idx)
        if self.log is not None:
            self._log_chain(head, length, slot)

    def _log_chain(self, head, length, slot):
        """Mark the pages the chain's ``length`` bytes and its used entry went to."""
        for gpa, size in self._written.pop(head, ()):
            if length <= 0:
                break
            self.log(gpa, min(size, length))
            length -= size
        # The used ring at the log address SET_VRING_ADDR gave (VHOST_VRING_F_LOG):
        # the element (8 bytes at 4 + 4 * slot) and the index (2 bytes at 2).
        if self.log_used and self.addr.flags & 1:
            self.log(self.addr.log + 4 + 4 * slot, 8)
            self.log(self.addr.log + 2, 2)

    def arm(self):
        """Ask for a kick at the next new chain; True if one came in meanwhile (EVENT_IDX)."""
        if not self.event_idx:
            return False
        self._avail_event_store(0, self.last_avail)
        if self.log is not None and self.log_used and self.addr.flags & 1:
            self.log(self.addr.log + 4 + 8 * self.num, 2)
        self._fences.full()  # avail_event visible before we look at avail->idx again
        return self._avail(1) != self.last_avail

    def notify(self, old_used):
        """Signal the call eventfd if the driver wants to hear of entries used since old_used."""
        if self.used_idx == old_used or self.call is None:
            return
        self._fences.full()  # used->idx visible before we read the driver's wish (2.7.10)
        if self.event_idx:
            wanted = _need_event(self._avail(2 + self.num), self.used_idx, old_used)
        else:
            wanted = not self._avail(0) & _AVAIL_F_NO_INTERRUPT
        if wanted:
            try:
                os.write(self.call, _ONE)
            except BlockingIOError:
                pass  # counter saturated: signalled anyway


def _gather(buffers, limit=None):
    """The bytes of (mmap, offset, length) buffers, at most ``limit``."""
    parts = []
    for mapped, offset, length in buffers:
        if limit is not None:
            length = min(length, limit - sum(map(len, parts)))
        parts.append(mapped[offset:offset + length])
    return b"".join(parts)


def _scatter(buffers, data):
    """Copy ``data`` into (mmap, offset, length) buffers in order; returns bytes copied."""
    done = 0
    for mapped, offset, length in buffers:
        take = min(length, len(data) - done)
        if take <= 0:
            break
        mapped[offset:offset + take] = data[done:done + take]
        done += take
    return done


class _EmbeddedBlock:
    """virtio-blk over a file or an anonymous memfd (virtio spec 5.2).

    Offers what qemu-storage-daemon 7.2 offers a driver, so that its config
    space reads the same for the same disk: SIZE_MAX (0), SEG_MAX (126),
    BLK_SIZE (512), FLUSH (fsync), TOPOLOGY, CONFIG_WCE (writeback 0), MQ,
    DISCARD (accepted and ignored, which the spec allows) and WRITE_ZEROES.
    """

    device_type = DeviceType.BLOCK
    _SEG_MAX = 126          # qemu-storage-daemon's: queue size 128 minus header and status
    _RANGE_SECTORS = 32768  # max_discard_sectors / max_write_zeroes_sectors, as qsd

    def __init__(self, path=None, size=64 << 20, read_only=False, num_queues=1,
                 serial=b"vu-embedded"):
        if path is None:
            self.fd = _memfd_create("vhost-user-embedded-blk", size)
        else:
            self.fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
            size = os.fstat(self.fd).st_size
        self.capacity = size - size % _SECTOR
        self.read_only = read_only
        self.num_queues = num_queues
        self.serial = serial[:_BLK_ID_BYTES]
        self.writeback = 0
        self.features = (_EMBEDDED_TRANSPORT | _BLK_F_SIZE_MAX | _BLK_F_SEG_MAX | _BLK_F_BLK_SIZE
                         | _BLK_F_FLUSH | _BLK_F_TOPOLOGY | _BLK_F_CONFIG_WCE | _BLK_F_MQ
                         | _BLK_F_DISCARD | _BLK_F_WRITE_ZEROES | (_BLK_F_RO if read_only else 0))

    def config(self):
        """struct virtio_blk_config up to write_zeroes_may_unmap and its padding (60 bytes)."""
        return struct.pack("<QIIHBBIBBHIBBHIIIIIB3x", self.capacity // _SECTOR, 0, self._SEG_MAX,
                           0, 0, 0, _SECTOR, 0, 0, 1, 1, self.writeback, 0, self.num_queues,
                           self._RANGE_SECTORS, 1, 1, self._RANGE_SECTORS, 1, 0)

    def write_config(self, offset, data):
        """Only ``writeback`` may be written (spec 5.2.5, CONFIG_WCE)."""
        if offset != 32 or len(data) != 1 or data[0] > 1:
            raise OSError(errno.EINVAL, "only writeback (1 byte at 32, 0 or 1) is writable")
        self.writeback = data[0]

    def process(self, backend, index):
        backend.drain(index, self._request)

    def _request(self, readable, writable):
        """Serve one request; returns the used length (status byte included)."""
        header = _gather(readable, _BLK_REQ.size)
        if len(header) < _BLK_REQ.size or not writable:
            raise _Refused("virtio-blk: a request needs a %d-byte header and a status byte"
                           % _BLK_REQ.size)
        kind, _, sector = _BLK_REQ.unpack(header)
        status_buffer = writable[-1]
        data_in = writable[:-1] + [status_buffer[:2] + (status_buffer[2] - 1,)]
        data_in = [b for b in data_in if b[2]]
        written = 0
        try:
            if kind == _BLK_T_IN:
                length = sum(b[2] for b in data_in)
                self._check(sector, length)
                written = _scatter(data_in, self._pread(sector * _SECTOR, length))
                status = 0
            elif kind == _BLK_T_OUT:
                data = _gather(readable)[_BLK_REQ.size:]
                self._check(sector, len(data), write=True)
                os.pwrite(self.fd, data, sector * _SECTOR)
                status = 0
            elif kind == _BLK_T_FLUSH:
                os.fsync(self.fd)
                status = 0
            elif kind == _BLK_T_GET_ID:
                written = _scatter(data_in, self.serial.ljust(_BLK_ID_BYTES, b"\0"))
                status = 0
            elif kind in (_BLK_T_DISCARD, _BLK_T_WRITE_ZEROES):
                status = self._ranges(kind, _gather(readable)[_BLK_REQ.size:])
            else:
                status = 2  # UNSUPP
        except OSError as exc:
            _log.warning("embedded blk: %s at sector %d: %s", _BLK_OP_NAMES.get(kind, kind),
                         sector, exc)
            status = 1  # IOERR
        mapped, offset, length = status_buffer
        mapped[offset + length - 1] = status
        return written + 1

    def _check(self, sector, length, write=False):
        if length % _SECTOR or sector * _SECTOR + length > self.capacity:
            raise OSError(errno.EINVAL, "%d bytes at sector %d: not whole sectors inside the "
                          "%d-byte disk" % (length, sector, self.capacity))
        if write and self.read_only:
            raise OSError(errno.EROFS, "the disk is read-only")

    def _pread(self, offset, length):
        data = os.pread(self.fd, length, offset)
        return data + bytes(length - len(data))  # past EOF of a sparse file: zeros

    def _ranges(self, kind, payload):
        if not payload or len(payload) % _BLK_DISCARD_SEG.size:
            return 1
        for i in range(0, len(payload), _BLK_DISCARD_SEG.size):
            sector, count, _ = _BLK_DISCARD_SEG.unpack_from(payload, i)
            if count > self._RANGE_SECTORS:
                return 1
            self._check(sector, count * _SECTOR, write=True)
            if kind == _BLK_T_WRITE_ZEROES:
                os.pwrite(self.fd, bytes(count * _SECTOR), sector * _SECTOR)
        return 0

    def close(self):
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class _EmbeddedNet:
    """virtio-net that sends every frame straight back (testpmd's io forward mode, spec 5.1).

    Each frame taken from the TX ring (1) goes to the next receive buffers
    of the RX ring (0), spread over several when MRG_RXBUF was acked. A
    frame that finds no receive buffer is dropped and counted, as on a
    wire; ``dropped`` says how many.
    """

    device_type = DeviceType.NET
    num_queues = 2
    mac = b"\x02\x76\x68\x75\x00\x01"  # locally administered, "vhu"
    mtu = 1500

    def __init__(self):
        self.features = _EMBEDDED_TRANSPORT | _NET_F_MAC | _NET_F_STATUS | _NET_F_MTU \
            | _NET_F_MRG_RXBUF
        self.dropped = 0

    def config(self):
        """mac, status (LINK_UP), max_virtqueue_pairs, mtu (12 bytes)."""
        return self.mac + struct.pack("<HHH", _NET_S_LINK_UP, 1, self.mtu)

    def write_config(self, offset, data):
        raise OSError(errno.EINVAL, "the net config space is read-only")

    def process(self, backend, index):
        if index == _NET_TX:
            rx = backend.rings.get(_NET_RX)
            old_used = rx.used_idx if rx is not None else None
            backend.drain(index, lambda readable, writable: self._echo(backend, rx, readable))
            if rx is not None and rx.ready:
                rx.notify(old_used)
        # New receive buffers need no work: frames are not queued for them.

    def _echo(self, backend, rx, readable):
        frame = _gather(readable)
        header_size = _NET_HDR.size if backend.acked_features & (
            VirtioFeature.VERSION_1 | _NET_F_MRG_RXBUF) else _NET_HDR_LEGACY_SIZE
        if len(frame) < header_size:
            raise _Refused("virtio-net: a TX chain of %d bytes is shorter than its header"
                           % len(frame))
        frame = frame[header_size:]
        if rx is None or not rx.ready:
            self.dropped += 1
            return 0
        mergeable = bool(backend.acked_features & _NET_F_MRG_RXBUF)
        start = rx.last_avail
        chains = []
        room = -header_size
        while room < len(frame) and (mergeable or not chains):
            chain = rx.pop(backend.memory)
            if chain is None:
                break
            head, readable_rx, writable_rx = chain
            if readable_rx:
                raise _Refused("virtio-net: an RX chain has device-readable buffers")
            chains.append((head, writable_rx))
            room += sum(b[2] for b in writable_rx)
        if room < len(frame):
            rx.last_avail = start  # give the buffers back: nothing was written
            self.dropped += 1
            return 0
        data = _NET_HDR.pack(0, 0, 0, 0, 0, 0, len(chains))[:header_size] + frame
        done = 0
        for head, writable_rx in chains:
            count = _scatter(writable_rx, data[done:])
            done += count
            rx.push(head, count)
        return 0

    def close(self):
        pass


class _EmbeddedBackend:
    """A vhost-user back-end for ``device``, serving one front-end at a time from one thread.

    Listens on ``path`` (a unix socket it creates; the next front-end is
    accepted when the current one hangs up, as qemu-storage-daemon does) or
    serves the one connected socket ``sock``. ``start()`` runs it on a
    thread named ``vhost-user-embedded-...``; ``serve()`` runs it on the
    calling thread (the child process of ``_spawn_embedded``) until
    ``stop()`` or EOF on ``stop_fd``. ``close()`` stops and frees everything.

    With ``dirty_log=True`` it also offers VHOST_F_LOG_ALL and LOG_SHMFD, as
    libvhost-user does: after SET_LOG_BASE (answered with mmap_size, as
    libvhost-user does) and LOG_ALL it marks every guest page it writes,
    buffers and (on rings with VHOST_VRING_F_LOG) used-ring entries;
    ``log_used = False`` makes it forget the used ring, as a buggy back-end
    would.
    """

    log_used = True

    def __init__(self, device, path=None, sock=None, timeout=5.0, dirty_log=False):
        self.device = device
        self.path = path
        self.timeout = timeout
        self.dirty_log = dirty_log
        self._log = None            # (mmap, offset, size) of the front-end's dirty log
        self.sessions = 0
        self._listener = None
        self._stop = Event()
        self._closed = False
        self._thread = None
        self._channel = None
        self._reset_session()
        self._handlers = {
            _F.GET_FEATURES: lambda body, fds: _U64.pack(self._offered_features()),
            _F.SET_FEATURES: self._set_features,
            _F.SET_OWNER: lambda body, fds: None,
            _F.RESET_OWNER: self._reset_owner,
            _F.SET_MEM_TABLE: self._set_mem_table,
            _F.SET_VRING_NUM: self._set_vring_num,
            _F.SET_VRING_ADDR: self._set_vring_addr,
            _F.SET_VRING_BASE: self._set_vring_base,
            _F.GET_VRING_BASE: self._get_vring_base,
            _F.SET_VRING_KICK: functools.partial(self._set_vring_fd, _F.SET_VRING_KICK),
            _F.SET_VRING_CALL: functools.partial(self._set_vring_fd, _F.SET_VRING_CALL),
            _F.SET_VRING_ERR: functools.partial(self._set_vring_fd, _F.SET_VRING_ERR),
            _F.GET_PROTOCOL_FEATURES: lambda body, fds: _U64.pack(self._offered_protocol()),
            _F.SET_LOG_BASE: self._set_log_base,
            _F.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            _F.GET_QUEUE_NUM: lambda body, fds: _U64.pack(self.device.num_queues),
            _F.SET_VRING_ENABLE: self._set_vring_enable,
            _F.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            _F.GET_CONFIG: self._get_config,
            _F.SET_CONFIG: self._set_config,
        }
        try:
            if path is not None:
                self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._listener.bind(path)
                self._listener.listen(1)
            elif sock is not None:
                self._channel = _Channel(sock, timeout)
            else:
                raise ValueError("the embedded back-end needs a socket path or a connected socket")
        except BaseException:
            self.close()
            raise

    def _reset_session(self):
        self._close_log()
        self.acked_features = 0
        self.protocol_features = 0
        self.memory = None
        self.rings = {}
        self._backend_req = None
        self._session_fds = set()   # kick fds the poller watches
        self._retired = []          # kick fds to close once no longer watched
        self._startable = []        # rings to run once the current request is answered

    # -- running ------------------------------------------------------------------

    def start(self):
        """Serve on a thread of its own; returns self."""
        self._thread = threading.Thread(target=self._serve_logged, daemon=True,
                                        name="vhost-user-embedded-%s"
                                        % self.device.device_type.name.lower())
        self._thread.start()
        return self

    def _serve_logged(self):
        try:
            self.serve()
        except BaseException as exc:
            _log.error("embedded back-end failed: %s", exc, exc_info=True)

    def serve(self, stop_fd=None):
        """Serve until ``stop()`` or EOF on ``stop_fd`` (or the hang-up of a ``sock``)."""
        poller = select.epoll()
        try:
            handlers = {self._stop.fileno(): None}
            poller.register(self._stop.fileno(), select.EPOLLIN)
            if stop_fd is not None:
                handlers[stop_fd] = None
                poller.register(stop_fd, select.EPOLLIN)
            if self._channel is not None:
                self._watch_session(poller, handlers)
            else:
                handlers[self._listener.fileno()] = self._accept
                poller.register(self._listener.fileno(), select.EPOLLIN)
            while True:
                try:
                    events = poller.poll()
                except InterruptedError:  # PyPy may not retry EINTR itself (PEP 475)
                    continue
                for fd, _ in events:
                    if fd not in handlers:
                        continue  # unregistered earlier in this batch
                    if handlers[fd] is None:
                        return
                    if handlers[fd](poller, handlers, fd) is False:
                        return
        finally:
            poller.close()
            self._end_session()

    def stop(self):
        """Make ``serve`` return and join the thread; safe to call twice."""
        if not self._closed:
            self._stop.signal()
        if self._thread is not None:
            self._thread.join(self.timeout * 2)
            self._thread = None

    def close(self):
        """Stop, end the session, close the socket and the device; safe to call twice."""
        self.stop()
        self._end_session()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self._closed = True
        self._stop.close()
        self.device.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- sessions -----------------------------------------------------------------

    def _accept(self, poller, handlers, fd):
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self._channel = _Channel(sock, self.timeout)
        # One front-end at a time: the next waits in the listen backlog.
        poller.unregister(fd)
        del handlers[fd]
        self._watch_session(poller, handlers)

    def _watch_session(self, poller, handlers):
        self.sessions += 1
        handlers[self._channel.fileno()] = self._message
        poller.register(self._channel.fileno(), select.EPOLLIN)

    def _sync_kicks(self, poller, handlers):
        """Watch the kick eventfd of every started ring, and only those."""
        wanted = {ring.kick: ring.index for ring in self.rings.values()
                  if ring.started and ring.kick is not None}
        for fd in list(self._session_fds):
            if fd not in wanted:
                poller.unregister(fd)
                del handlers[fd]
                self._session_fds.discard(fd)
        # Closed only now that the poller forgot them: a number reused by a
        # new kick fd must not be mistaken for one already watched.
        _close_fds(self._retired)
        self._retired = []
        for fd, index in wanted.items():
            if fd not in self._session_fds:
                handlers[fd] = functools.partial(self._kick, index)
                poller.register(fd, select.EPOLLIN)
                self._session_fds.add(fd)

    def _kick(self, index, poller, handlers, fd):
        try:
            os.read(fd, 8)
        except BlockingIOError:
            return None
        return self._run_device(poller, handlers, index)

    def _run_device(self, poller, handlers, index):
        ring = self.rings.get(index)
        if ring is None or not ring.ready:
            return None
        try:
            self.device.process(self, index)
        except _Refused as exc:
            _log.warning("embedded back-end: %s; dropping the front-end", exc)
            return self._hang_up(poller, handlers)
        return None

    def drain(self, index, serve):
        """Serve every available chain of ring ``index``, then interrupt the driver if it wants.

        ``serve(readable, writable)`` handles one chain and returns the used
        length. With EVENT_IDX, avail_event asks for a kick at the next chain
        and avail->idx is read once more, for a chain that raced it.
        """
        ring = self.rings[index]
        old_used = ring.used_idx
        while True:
            chain = ring.pop(self.memory)
            if chain is None:
                if ring.arm():
                    continue
                break
            head, readable, writable = chain
            ring.push(head, serve(readable, writable))
        ring.notify(old_used)

    def _message(self, poller, handlers, fd):
        channel = self._channel
        try:
            code, flags, size, fds = channel.recv_header("front-end request", timeout=None)
        except Disconnected:
            _log.info("embedded back-end: the front-end hung up")
            return self._hang_up(poller, handlers)
        except VhostUserError as exc:
            _log.warning("embedded back-end: dropping the front-end: %s", exc)
            return self._hang_up(poller, handlers)
        request = code
        try:
            request = FrontendReq(code)
        except ValueError:
            pass
        name = _req_name(request)
        need_reply = bool(flags & _FLAG_NEED_REPLY and self.protocol_features & _P.REPLY_ACK)
        try:
            if flags & ~(_FLAG_VERSION_MASK | _FLAG_NEED_REPLY) or \
                    flags & _FLAG_VERSION_MASK != _VERSION:
                raise _Refused("%s: flags %#x, expected version 1 with only NEED_REPLY"
                               % (name, flags), request)
            body = channel.recv_body(size, name)
            handler = self._handlers.get(request)
            if handler is None:
                raise _Refused("%s: not supported by the embedded back-end" % name, request)
            try:
                reply = handler(body, fds)
            except ProtocolError as exc:  # a payload the codec refused
                raise _Refused(str(exc), request)
            except OSError as exc:  # refused, but the connection stays (SET_CONFIG)
                _log.warning("embedded back-end: %s refused: %s", name, exc.strerror or exc)
                reply = None
                if need_reply:
                    channel.send(code, _VERSION | _FLAG_REPLY, _U64.pack(1), what=name)
                    need_reply = False
            if reply is not None:
                channel.send(code, _VERSION | _FLAG_REPLY, reply, what=name)
            elif need_reply:
                channel.send(code, _VERSION | _FLAG_REPLY, _U64.pack(0), what=name)
        except _Refused as exc:
            _log.warning("embedded back-end: %s; dropping the front-end", exc)
            if need_reply:
                try:
                    channel.send(code, _VERSION | _FLAG_REPLY, _U64.pack(1), what=name)
                except VhostUserError:
                    pass
            return self._hang_up(poller, handlers)
        except Disconnected:
            _log.info("embedded back-end: the front-end hung up")
            return self._hang_up(poller, handlers)
        except VhostUserError as exc:  # a broken stream: oversized body, a timeout
            _log.warning("embedded back-end: dropping the front-end: %s", exc)
            return self._hang_up(poller, handlers)
        finally:
            _close_fds(fds)
        self._sync_kicks(poller, handlers)
        # A ring that became ready runs at once, for chains already available:
        # libvhost-user kicks itself on SET_VRING_KICK for the same reason.
        startable, self._startable = self._startable, []
        for index in startable:
            result = self._run_device(poller, handlers, index)
            if self._channel is None:
                return result
        return None

    def _hang_up(self, poller, handlers):
        """End the session; False (stop serving) when there is no listener to accept again."""
        for fd in list(self._session_fds) + [self._channel.fileno()]:
            poller.unregister(fd)
            del handlers[fd]
        self._session_fds = set()
        self._end_session()
        if self._listener is None:
            return False
        handlers[self._listener.fileno()] = self._accept
        poller.register(self._listener.fileno(), select.EPOLLIN)
        return None

    def _end_session(self):
        _close_fds(self._retired)
        for ring in self.rings.values():
            ring.close()
        if self.memory is not None:
            self.memory.close()
        if self._backend_req is not None:
            self._backend_req.close()
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        self._reset_session()

    # -- requests -------------------------------------------------------------------

    def _ring(self, index, request):
        # BACKENDS.md 10: libvhost-user trusts this index and crashes on a bad one.
        if not 0 <= index < self.device.num_queues:
            raise _Refused("%s: ring index %d, the device has %d ring(s)"
                           % (_req_name(request), index, self.device.num_queues), request)
        ring = self.rings.get(index)
        if ring is None:
            ring = self.rings[index] = _DeviceRing(index)
        return ring

    def _expect_fds(self, request, fds, count):
        if len(fds) != count:
            raise _Refused("%s: %d fd(s) attached, expected %d"
                           % (_req_name(request), len(fds), count), request)

    def _offered_features(self):
        return self.device.features | (VirtioFeature.LOG_ALL if self.dirty_log else 0)

    def _offered_protocol(self):
        return _EMBEDDED_PROTOCOL | (_P.LOG_SHMFD if self.dirty_log else 0)

    def _set_features(self, body, fds):
        features = _decode_u64(_F.SET_FEATURES, body)
        extra = features & ~self._offered_features()
        if extra:
            raise _Refused("SET_FEATURES: bits %#x were not offered" % extra, _F.SET_FEATURES)
        if not features & VirtioFeature.VERSION_1:
            raise _Refused("SET_FEATURES: legacy virtio (no VERSION_1) is not supported, as "
                           "in libvhost-user", _F.SET_FEATURES)
        self.acked_features = features
        for ring in self.rings.values():
            self._ring_features(ring)

    def _ring_features(self, ring):
        ring.event_idx = bool(self.acked_features & VirtioFeature.RING_EVENT_IDX)
        ring.indirect = bool(self.acked_features & VirtioFeature.RING_INDIRECT_DESC)
        logging = self._log is not None and self.acked_features & VirtioFeature.LOG_ALL
        ring.log = self._log_write if logging else None
        ring.log_used = self.log_used
        # Spec "Ring states": without PROTOCOL_FEATURES rings are enabled at once.
        if not self.acked_features & VirtioFeature.PROTOCOL_FEATURES:
            ring.enabled = True

    def _set_protocol_features(self, body, fds):
        features = _decode_u64(_F.SET_PROTOCOL_FEATURES, body)
        extra = features & ~self._offered_protocol()
        if extra:
            raise _Refused("SET_PROTOCOL_FEATURES: bits %#x were not offered" % extra,
                           _F.SET_PROTOCOL_FEATURES)
        self.protocol_features = features

    def _reset_owner(self, body, fds):
        """RESET_OWNER (deprecated): "disable all rings", as the spec suggests."""
        for ring in self.rings.values():
            self._retire_kick(ring)
            ring.close()
        self.rings = {}

    def _retire_kick(self, ring):
        if ring.kick is not None:
            self._retired.append(ring.kick)
            ring.kick = None

    def _set_mem_table(self, body, fds):
        regions = _decode_mem_table(_F.SET_MEM_TABLE, body)
        if not 1 <= len(regions) <= MAX_MEM_TABLE_REGIONS:
            raise _Refused("SET_MEM_TABLE: %d regions, 1..%d are allowed"
                           % (len(regions), MAX_MEM_TABLE_REGIONS), _F.SET_MEM_TABLE)
        self._expect_fds(_F.SET_MEM_TABLE, fds, len(regions))
        memory = _MappedMemory(regions, fds)
        for ring in self.rings.values():
            ring.unmap()
        if self.memory is not None:
            self.memory.close()
        self.memory = memory
        for ring in self.rings.values():  # libvhost-user re-maps the rings too
            ring.map(memory)

    def _set_vring_num(self, body, fds):
        state = _decode_state(_F.SET_VRING_NUM, body)
        ring = self._ring(state.index, _F.SET_VRING_NUM)
        if not 0 < state.num <= _EMBEDDED_QUEUE_MAX or state.num & (state.num - 1):
            raise _Refused("SET_VRING_NUM: ring %d size %d is not a power of two up to %d"
                           % (state.index, state.num, _EMBEDDED_QUEUE_MAX), _F.SET_VRING_NUM)
        ring.unmap()
        ring.num = state.num
        ring.addr = None

    def _set_vring_addr(self, body, fds):
        addr = _decode_vring_addr(_F.SET_VRING_ADDR, body)
        ring = self._ring(addr.index, _F.SET_VRING_ADDR)
        if addr.flags & ~1 or addr.flags and not self.dirty_log:
            raise _Refused("SET_VRING_ADDR: flags %#x (%s)" % (
                addr.flags, "only bit 0, VHOST_VRING_F_LOG, is defined" if self.dirty_log
                else "logging is not supported"), _F.SET_VRING_ADDR)
        if not ring.num:
            raise _Refused("SET_VRING_ADDR: ring %d has no size yet (SET_VRING_NUM first)"
                           % addr.index, _F.SET_VRING_ADDR)
        if self.memory is None:
            # BACKENDS.md 7: libvhost-user translates ring addresses at once.
            raise _Refused("SET_VRING_ADDR: no memory table yet", _F.SET_VRING_ADDR)
        ring.addr = addr
        self._ring_features(ring)
        ring.map(self.memory)

    def _set_vring_base(self, body, fds):
        state = _decode_state(_F.SET_VRING_BASE, body)
        ring = self._ring(state.index, _F.SET_VRING_BASE)
        if state.num > 0xFFFF:  # PROTOCOL.md 2: bits 16-31 are for packed rings only
            raise _Refused("SET_VRING_BASE: base %#x of split ring %d does not fit in 16 bits"
                           % (state.num, state.index), _F.SET_VRING_BASE)
        ring.last_avail = state.num

    def _get_vring_base(self, body, fds):
        state = _decode_state(_F.GET_VRING_BASE, body)
        ring = self._ring(state.index, _F.GET_VRING_BASE)
        # Stops the ring (spec "Ring states"); requests are served inline, so
        # nothing is left in flight to drain.
        self._retire_kick(ring)
        ring.started = False
        return _encode_state(VringState(state.index, ring.last_avail))

    def _set_vring_fd(self, request, body, fds):
        value = _decode_u64(request, body)
        if value & ~(_VRING_IDX_MASK | _VRING_NOFD):
            raise _Refused("%s: reserved bits set in %#x" % (_req_name(request), value), request)
        no_fd = bool(value & _VRING_NOFD)
        self._expect_fds(request, fds, 0 if no_fd else 1)
        ring = self._ring(value & _VRING_IDX_MASK, request)
        if request == _F.SET_VRING_KICK:
            if no_fd:
                raise _Refused("SET_VRING_KICK: polling mode (no kick fd) is not supported",
                               request)
            self._retire_kick(ring)
            ring.kick = fds.pop()
            ring.started = True  # spec "Ring states": a ring starts here
            self._startable.append(ring.index)
        elif request == _F.SET_VRING_CALL:
            if ring.call is not None:
                os.close(ring.call)
            ring.call = None if no_fd else fds.pop()
        # SET_VRING_ERR: errors are never reported; its fd is closed with the rest.

    def _set_backend_req_fd(self, body, fds):
        self._expect_fds(_F.SET_BACKEND_REQ_FD, fds, 1)
        if self._backend_req is not None:
            self._backend_req.close()
        self._backend_req = socket.socket(fileno=fds.pop())

    def _set_vring_enable(self, body, fds):
        state = _decode_state(_F.SET_VRING_ENABLE, body)
        ring = self._ring(state.index, _F.SET_VRING_ENABLE)
        if state.num > 1:
            raise _Refused("SET_VRING_ENABLE: num %d is not 0 or 1" % state.num,
                           _F.SET_VRING_ENABLE)
        ring.enabled = bool(state.num)
        if ring.enabled:
            self._startable.append(state.index)

    def _set_log_base(self, body, fds):
        """SET_LOG_BASE (LOG_SHMFD): map the log; the reply echoes mmap_size (libvhost-user)."""
        if not self.protocol_features & _P.LOG_SHMFD:
            raise _Refused("SET_LOG_BASE: LOG_SHMFD was not negotiated", _F.SET_LOG_BASE)
        self._expect_fds(_F.SET_LOG_BASE, fds, 1)
        if len(body) != _LOG.size:
            raise _Refused("SET_LOG_BASE: a %d-byte payload, expected %d"
                           % (len(body), _LOG.size), _F.SET_LOG_BASE)
        size, offset = _LOG.unpack(body)
        fd = fds[0]
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _file_seals(fd) & _F_SEAL_SHRINK \
                or st.st_size < size + offset or not size:
            raise _Refused("SET_LOG_BASE: the log fd is not a sealed memfd of at least "
                           "mmap_offset %d + mmap_size %d bytes (it has %d)"
                           % (offset, size, st.st_size), _F.SET_LOG_BASE)
        mapped = mmap.mmap(fd, size + offset, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._close_log()
        self._log = (mapped, offset, size)
        for ring in self.rings.values():
            self._ring_features(ring)
        return _U64.pack(size)

    def _log_write(self, gpa, length):
        """Set the log bit of every page of ``length`` bytes at ``gpa``."""
        mapped, offset, size = self._log
        for page in range(gpa // _LOG_PAGE, (gpa + length - 1) // _LOG_PAGE + 1):
            at = offset + page // 8
            if at >= offset + size:
                raise _Refused("dirty log: page %d (GPA %#x) is past the %d-byte log"
                               % (page, gpa, size))
            mapped[at] |= 1 << (page % 8)

    def _close_log(self):
        log, self._log = getattr(self, "_log", None), None
        if log is not None:
            log[0].close()

    def _get_config(self, body, fds):
        config = _decode_config(_F.GET_CONFIG, body)
        space = self.device.config()
        size = len(config.data)
        if not size or config.offset + size > len(space):
            # libvhost-user's answer to a failed GET_CONFIG: a reply of size 0.
            _log.warning("embedded back-end: GET_CONFIG of %d bytes at %d, the config space "
                         "has %d", size, config.offset, len(space))
            return b""
        return _encode_config(DeviceConfig(config.offset, config.flags,
                                           space[config.offset:config.offset + size]))

    def _set_config(self, body, fds):
        config = _decode_config(_F.SET_CONFIG, body)
        self.device.write_config(config.offset, config.data)


# The child process runs this module's own file in a fresh interpreter, so
# it works whatever name the module was imported under (or run as a script)
# and nothing is forked from a process that may have threads.
_CHILD_BOOTSTRAP = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_vhost_user_child', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "sys.exit(module._child_main(sys.argv[2:]))\n")


def _spawn_child(args, log_path=None, pass_fds=()):
    """Run ``_child_main(args)`` in a new interpreter; returns the Popen.

    The child gets its own session (a terminal's Ctrl-C is for its parent,
    who stops it) and a pipe as stdin that this process holds: it exits when
    the pipe closes, so it never outlives its parent, even one killed by
    SIGKILL. Close ``proc.stdin`` (or send SIGTERM) to stop it.
    """
    import subprocess
    source = os.path.abspath(__file__)
    with open(log_path or os.devnull, "ab") as log:
        return subprocess.Popen([sys.executable, "-c", _CHILD_BOOTSTRAP, source] + list(args),
                                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, pass_fds=pass_fds)


def _spawn_embedded(kind, socket_path, disk=None, size=64 << 20, log_path=None):
    """The embedded back-end (``blk`` or ``net``) in a child process, serving on ``socket_path``.

    blk serves ``disk`` (a file) or, without one, a memfd of ``size``
    bytes. The caller waits for the socket to appear.
    """
    return _spawn_child(["serve", kind, socket_path, str(size)] + ([disk] if disk else []),
                        log_path)


def _child_main(argv):
    """What a child process of this module does: ``serve KIND SOCKET SIZE [DISK]``."""
    import signal
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if argv[0] == "ring-writer":
        return _ring_writer(int(argv[1]), int(argv[2]))
    kind, path, size = argv[1], argv[2], int(argv[3])
    device = _EmbeddedBlock(argv[4] if len(argv) > 4 else None, size) if kind == "blk" \
        else _EmbeddedNet()
    with _EmbeddedBackend(device, path=path) as backend:
        # SIGTERM ends serving cleanly: the socket file is removed on the way out.
        signal.signal(signal.SIGTERM, lambda signum, frame: backend.stop())
        backend.serve(stop_fd=sys.stdin.fileno())
    return 0


# The layout of the cross-process ring check (``selftest``): u16 words.
_PROBE_IDX, _PROBE_CONSUMED, _PROBE_SLOTS = 0, 1, 32
_PROBE_RING = 256


def _probe_value(i):
    """What slot ``i`` of the ring check holds: changes both bytes from one i to the next."""
    return (i * 40503 ^ 0x5A5A) & 0xFFFF


def _ring_writer(fd, count):
    """Child side of the ring check: publish ``count`` entries as a driver publishes avail.

    Each entry is written before the index that covers it (spec 2.7.13),
    never more than the ring holds ahead of what the reader consumed.
    """
    mapped = mmap.mmap(fd, _PAGE_SIZE)
    view = memoryview(mapped)
    load, store, words = _ring_words(view, "H")
    fences = _Fences()
    deadline = time.monotonic() + 30
    try:
        for i in range(1, count + 1):
            while (i - 1 - load(_PROBE_CONSUMED)) & 0xFFFF >= _PROBE_RING:
                if time.monotonic() > deadline:
                    return 1
            store(_PROBE_SLOTS + i % _PROBE_RING, _probe_value(i))
            fences.write()
            store(_PROBE_IDX, i & 0xFFFF)
        return 0
    finally:
        words.release()
        view.release()
        mapped.close()


############################################################################
# Conformance checks #######################################################
############################################################################

# ``validate``: a catalogue of checks a vhost-user back-end either passes or
# fails, each resting on one sentence of QEMU's docs/interop/vhost-user.rst
# (cited by section title) or of the virtio spec (cited by section number,
# virtio 1.2). The driver side is done here by hand, on GuestMemory, Event
# and BackendClient only, never through Queue or the devices: a check must
# be able to build what a correct driver never would (a ring base near the
# 16-bit wrap, a chain across two regions, a looped chain) and to observe
# exactly what the back-end did with it.
#
# Each check returns its verdict by raising ``_Verdict`` (or returning a
# pass detail). A check that needs a clean back-end state runs on a fresh
# connection; the others share one session, which is also all a back-end
# that serves a single connection (virtiofsd 7.2) ever gets. Every wait is
# bounded by the one timeout: a reply (the client's reply timeout), a used
# entry, an interrupt.

_VALIDATE_RESULTS = ("pass", "fail", "skip", "error")
#: Split-ring size the checks use, and the scratch sector blk writes go to
#: (its old contents are read first and written back).
_V_RING = 64
_V_SECTOR = 8
#: How long a check watches for something that must NOT happen (a chain
#: processed on a stopped ring, an interrupt before used_event): capped by
#: the timeout.
_V_GRACE = 0.3
_V_REGION1 = 0x40000000       # GPA of the second region of the multi-region layouts
_V_UNSUPPORTED = 0x7F00        # a request code no spec revision defines
_RS = 'vhost-user.rst "%s"'   # QEMU docs/interop/vhost-user.rst, by section title
_V_KNOWN_PROTOCOL = sum(int(m) for m in ProtocolFeature)
_V_KNOWN_TRANSPORT = sum(int(m) for m in VirtioFeature)
#: What the checks negotiate: not what needs a VMM behind the front-end
#: (userfaultfd, a crypto API, an IOMMU, Xen, in-band calls, a back-end
#: channel someone serves); proto.backend-req negotiates BACKEND_REQ alone.
_V_PROTOCOL = _V_KNOWN_PROTOCOL & ~(
    _P.PAGEFAULT | _P.CRYPTO_SESSION | _P.HOST_NOTIFIER | _P.XEN_MMAP
    | _P.INBAND_NOTIFICATIONS | _P.GPA_ADDRESSES | _P.SHARED_OBJECT
    | _P.GET_VRING_BASE_INFLIGHT | _P.GET_VRING_BASE_SKIP_DRAIN
    | _P.BACKEND_REQ | _P.BACKEND_SEND_FD | _P.CROSS_ENDIAN)


class _Verdict(Exception):
    """A check's outcome other than pass: ``result`` is fail, skip or error."""

    def __init__(self, result, detail):
        Exception.__init__(self, detail)
        self.result, self.detail = result, detail


def _vfail(detail, *args):
    raise _Verdict("fail", detail % args if args else detail)


def _vskip(detail, *args):
    raise _Verdict("skip", detail % args if args else detail)


class _VCheck(NamedTuple):
    id: str
    spec: str
    fresh: bool          # needs its own connection
    destructive: bool    # may crash a back-end: only with --destructive, run last
    promised: bool       # its requests are promised by what was offered: a hang-up fails
    run: object


_V_CHECKS = []


def _vcheck(check_id, spec, fresh=False, destructive=False, promised=False):
    def register(run):
        _V_CHECKS.append(_VCheck(check_id, spec, fresh, destructive, promised, run))
        return run
    return register


class _VRing:
    """The driver side of one split ring in guest memory, written by hand (virtio 2.7)."""

    def __init__(self, mem, index, size=_V_RING):
        self.mem, self.index, self.size = mem, index, size
        desc, avail, used = _split_ring_sizes(size)
        self.desc = mem.allocate(desc, 16)
        self.avail = mem.allocate(avail, 2)
        self.used = mem.allocate(used, 4)
        self.kick, self.call = Event(), Event()
        self._views = []
        self._avail_words = self._words(self.avail, avail)
        self._used_words = self._words(self.used, used)
        self.next_desc = 0
        self.avail_idx = self.used_seen = 0
        self.set_base(0)

    def _words(self, gpa, length):
        view = self.mem.view(gpa, length)
        load, store, words = _ring_words(view, "H")
        self._views += [words, view] if words is not view else [view]
        return load, store

    def set_base(self, base):
        """Make avail->idx and used->idx ``base``, as a ring stopped there looks."""
        self.avail_idx = self.used_seen = base & 0xFFFF
        self._avail_words[1](1, self.avail_idx)
        self._used_words[1](1, self.used_seen)

    def addr(self):
        h = self.mem.host_address
        return h(self.desc), h(self.used), h(self.avail)

    def chain(self, buffers, indirect=False):
        """Write a chain of (gpa, length, device_writable) buffers; returns the head."""
        flags = [_DESC_F_WRITE if w else 0 for _, _, w in buffers]
        if indirect:
            table = self.mem.allocate(16 * len(buffers), 16)
            for i, (gpa, length, _) in enumerate(buffers):
                nxt = i + 1 if i + 1 < len(buffers) else 0
                self.mem.write(table + 16 * i, _DESC.pack(
                    gpa, length, flags[i] | (_DESC_F_NEXT if i + 1 < len(buffers) else 0), nxt))
            buffers, flags = [(table, 16 * len(buffers), False)], [_DESC_F_INDIRECT]
        first = self.next_desc
        for i, (gpa, length, _) in enumerate(buffers):
            slot = (first + i) % self.size
            last = i + 1 == len(buffers)
            self.mem.write(self.desc + 16 * slot, _DESC.pack(
                gpa, length, flags[i] | (0 if last else _DESC_F_NEXT), (slot + 1) % self.size))
        self.next_desc = (first + len(buffers)) % self.size
        return first

    def raw_desc(self, slot, gpa, length, flags, nxt):
        self.mem.write(self.desc + 16 * slot, _DESC.pack(gpa, length, flags, nxt))

    def publish(self, *heads, **kwargs):
        """Put ``heads`` in the avail ring and move avail->idx (``jump`` moves it further)."""
        for head in heads:
            self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.size),
                           struct.pack("<H", head))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.avail_idx = (self.avail_idx + kwargs.get("jump", 0)) & 0xFFFF
        self._avail_words[1](1, self.avail_idx)

    @property
    def used_idx(self):
        return self._used_words[0](1)

    @property
    def avail_event(self):
        return self._used_words[0](2 + 4 * self.size)

    def set_used_event(self, value):
        self._avail_words[1](2 + self.size, value & 0xFFFF)

    def wait_used(self, count, timeout, what="a used entry"):
        """The next ``count`` used entries as (id, len); fails the check on timeout."""
        deadline = time.monotonic() + timeout
        while (self.used_idx - self.used_seen) & 0xFFFF < count:
            if time.monotonic() > deadline:
                got = (self.used_idx - self.used_seen) & 0xFFFF
                _vfail("no reply in %g s: %s on ring %d (%d of %d used entries came)",
                       timeout, what, self.index, got, count)
            time.sleep(0.0005)
        entries = []
        for _ in range(count):
            slot = self.used_seen % self.size
            entries.append(struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return entries

    def idle_for(self, seconds):
        """True when no used entry came for ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.used_idx != self.used_seen:
                return False
            time.sleep(0.002)
        return self.used_idx == self.used_seen

    def close(self):
        for view in self._views:
            view.release()
        self._views = []
        self.kick.close()
        self.call.close()


class _VSession:
    """One connection to the back-end, negotiated the way QEMU does, with rings on demand."""

    def __init__(self, v):
        self.v = v
        self.mem = None
        self.extra_mem = []
        self.rings = {}
        self.acks = []              # requests whose NEED_REPLY ack came back
        self.fuse_ready = False     # virtio-fs: FUSE_INIT done
        # One attempt: a back-end that stopped listening has crashed or served
        # its only connection, and waiting for it would only slow the verdict.
        self.client = BackendClient.connect(v.path, timeout=0, reply_timeout=v.timeout)

    def negotiate(self, protocol=None):
        """GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER, SET_FEATURES."""
        c, v = self.client, self.v
        self.features = c.get_features()
        self.offered_protocol = None
        if self.features & VirtioFeature.PROTOCOL_FEATURES:
            self.offered_protocol = c.get_protocol_features()
            want = _V_PROTOCOL if protocol is None else protocol
            c.set_protocol_features(self.offered_protocol & want)
            self.ack = bool(c.protocol_features & _P.REPLY_ACK)
            if c.protocol_features & _P.MQ:
                c.get_queue_num()
        else:
            self.ack = False
        v._learn(self)
        c.set_owner(ack=self._ack(_F.SET_OWNER))
        acked = self.features & (VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
                                 | VirtioFeature.RING_INDIRECT_DESC
                                 | VirtioFeature.RING_EVENT_IDX)
        if v.device_type == DeviceType.BLOCK:
            acked |= self.features & (_BLK_F_SIZE_MAX | _BLK_F_SEG_MAX | _BLK_F_BLK_SIZE
                                      | _BLK_F_FLUSH | _BLK_F_TOPOLOGY | _BLK_F_CONFIG_WCE
                                      | _BLK_F_MQ | _BLK_F_DISCARD | _BLK_F_WRITE_ZEROES
                                      | _BLK_F_RO)
        self.acked = acked
        c.set_features(acked, ack=self._ack(_F.SET_FEATURES))
        return self

    def _ack(self, request):
        if self.ack:
            self.acks.append(request)
        return self.ack

    @property
    def protocol(self):
        return self.client.protocol_features

    def memory(self, layout=((0, 4 << 20),), regions=None):
        """Guest memory and SET_MEM_TABLE (``regions(mem)`` may rewrite the table)."""
        self.mem = GuestMemory(layout, "vhost-user-validate")
        table = self.mem.regions() if regions is None else regions(self.mem)
        self.client.set_mem_table(table, ack=self._ack(_F.SET_MEM_TABLE))
        return self.mem

    def ring(self, index, base=0, size=_V_RING, enable=True, mem=None):
        """Set ring ``index`` up (NUM, BASE, ADDR, KICK, CALL, ENABLE) and return it."""
        ring = self.rings.get(index)
        if ring is None:
            ring = self.rings[index] = _VRing(mem or self.mem, index, size)
        ring.set_base(base)
        self.start(ring, base, enable)
        return ring

    def start(self, ring, base, enable=True):
        c, ack, i = self.client, self._ack, ring.index
        c.set_vring_num(i, ring.size, ack=ack(_F.SET_VRING_NUM))
        c.set_vring_base(i, base, ack=ack(_F.SET_VRING_BASE))
        desc, used, avail = ring.addr()
        c.set_vring_addr(i, desc, used, avail, ack=ack(_F.SET_VRING_ADDR))
        c.set_vring_kick(i, ring.kick, ack=ack(_F.SET_VRING_KICK))
        c.set_vring_call(i, ring.call, ack=ack(_F.SET_VRING_CALL))
        if enable and self.acked & VirtioFeature.PROTOCOL_FEATURES:
            c.set_vring_enable(i, True, ack=ack(_F.SET_VRING_ENABLE))
        ring.call.read()  # libvhost-user signals once at SET_VRING_CALL (BACKENDS.md 5)

    def rings_for_io(self, base=0, mem=None):
        """Start what the device type needs for I/O; returns the ring requests go to."""
        work = self.v.unit.ring
        for index in self.v.unit.rings:
            self.ring(index, base if index == work else 0, mem=mem)
        if self.protocol & _P.STATUS:
            # As QEMU at start: DPDK serves nothing before DRIVER_OK.
            self.client.set_status(1 | 2 | 8 | 4, ack=self._ack(_F.SET_STATUS))
        return self.rings[work]

    def alive(self):
        """A GET_FEATURES round trip: True if answered."""
        try:
            self.client.get_features()
            return True
        except (Disconnected, ProtocolError):
            return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.client.close()
        for ring in self.rings.values():
            ring.close()
        for mem in [self.mem] + self.extra_mem:
            if mem is not None:
                mem.close()


class _VUnit:
    """One request per device type that a check posts and watches complete.

    ``rings`` are the rings the type needs started, ``ring`` the one
    requests go to; ``post(s, ring)`` posts one side-effect-free request
    and kicks, returning its head.
    """
    rings, ring = (0,), 0  # type: Tuple[int, ...], int

    def __init__(self, v):
        self.v = v


class _VBlockUnit(_VUnit):
    rings, ring = (0,), 0

    def request(self, s, kind, sector=0, data=b"", length=0, mem=None, ring=None,
                indirect=False, wait=True):
        """One virtio-blk request (virtio 5.2.6); returns (status, data read)."""
        mem = mem or s.mem        # data goes there; header and status stay in s.mem
        ring = ring or s.rings[0]
        hdr = s.mem.allocate(16, 16)
        s.mem.write(hdr, _BLK_REQ.pack(kind, 0, sector))
        buffers = [(hdr, 16, False)]
        buf = None
        if data:
            buf = mem.allocate(len(data), 16)
            mem.write(buf, data)
            buffers.append((buf, len(data), False))
        elif length:
            buf = mem.allocate(length, 16)
            mem.write(buf, b"\xa5" * length)
            buffers.append((buf, length, True))
        status = s.mem.allocate(1, 1)
        s.mem.write(status, b"\xff")
        buffers.append((status, 1, True))
        head = ring.chain(buffers, indirect)
        ring.publish(head)
        ring.kick.signal()
        if not wait:
            return head
        (used_head, _), = ring.wait_used(1, self.v.timeout, "a %s request"
                                         % _BLK_OP_NAMES.get(kind, kind))
        if used_head != head:
            _vfail("used entry for descriptor %d, the request was at %d", used_head, head)
        got = mem.read(buf, length) if length else b""
        return bytearray(s.mem.read(status, 1))[0], got

    def post(self, s, ring, indirect=False, mem=None):
        return self.request(s, _BLK_T_IN, 0, length=512, ring=ring, indirect=indirect,
                            mem=mem, wait=False)


class _VNetUnit(_VUnit):
    rings, ring = (0, 1), 1
    _FRAME = bytes(bytearray([0xff] * 6 + [0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x88, 0xb5]))

    def post(self, s, ring, indirect=False, mem=None, tag=b"vu-validate"):
        mem = mem or s.mem
        frame = _NET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + self._FRAME + tag.ljust(46, b"\0")
        self.sent = frame[_NET_HDR.size:]
        buf = mem.allocate(len(frame), 16)
        mem.write(buf, frame)
        head = ring.chain([(buf, len(frame), False)], indirect)
        ring.publish(head)
        ring.kick.signal()
        return head

    def fill_rx(self, s, count=8):
        rx = s.rings[0]
        bufs = []
        for _ in range(count):
            buf = s.mem.allocate(2048, 16)
            bufs.append(buf)
            rx.publish(rx.chain([(buf, 2048, True)]))
        rx.kick.signal()
        return bufs


class _VFsUnit(_VUnit):
    rings, ring = (0, 1), 1

    def fuse(self, s, opcode, nodeid, args, out_size, ring=None, indirect=False, wait=True):
        """One FUSE request on the request queue (virtio 5.11.6); returns (error, payload)."""
        ring = ring or s.rings[1]
        unique = getattr(self, "_unique", 0) + 2
        self._unique = unique
        body = _FUSE_IN_HEADER.pack(_FUSE_IN_HEADER.size + len(args), opcode, unique, nodeid,
                                    0, 0, 0, 0, 0) + args
        inbuf = s.mem.allocate(len(body), 16)
        s.mem.write(inbuf, body)
        out = s.mem.allocate(_FUSE_OUT_HEADER.size + out_size, 16)
        head = ring.chain([(inbuf, len(body), False),
                           (out, _FUSE_OUT_HEADER.size + out_size, True)], indirect)
        ring.publish(head)
        ring.kick.signal()
        if not wait:
            return head
        ring.wait_used(1, self.v.timeout, "a FUSE request (opcode %d)" % opcode)
        length, error, got_unique = _FUSE_OUT_HEADER.unpack(
            s.mem.read(out, _FUSE_OUT_HEADER.size))
        if got_unique != unique:
            _vfail("FUSE reply for request %d, expected %d", got_unique, unique)
        return error, s.mem.read(out + _FUSE_OUT_HEADER.size, max(0, length - 16))

    def init(self, s):
        args = struct.pack("<IIII", _FUSE_MAJOR, _FUSE_MINOR, 0, 0)
        return self.fuse(s, _FuseOp.INIT, 0, args, 64)

    def getattr_args(self):
        return _FUSE_GETATTR_IN.pack(0, 0, 0)

    def post(self, s, ring, indirect=False, mem=None):
        return self.fuse(s, _FuseOp.GETATTR, _FUSE_ROOT_ID, self.getattr_args(),
                         _FUSE_ATTR_OUT.size + _FUSE_ATTR.size, ring, indirect, wait=False)


_V_UNITS = {DeviceType.BLOCK: _VBlockUnit, DeviceType.NET: _VNetUnit, DeviceType.FS: _VFsUnit}


class _Validator:
    """Runs the catalogue against the back-end at ``path``; ``run()`` returns the report."""

    def __init__(self, path, device_type=None, only=None, timeout=5.0, destructive=False):
        self.path, self.device_type = path, device_type
        self.only, self.timeout, self.destructive = only, timeout, destructive
        self.features = self.protocol = None
        self.single = None         # why later connections are not served, once known
        self._lost = False         # a check ended with the back-end gone (error)
        self.unit = None
        self._session = None

    def selected(self):
        import fnmatch
        return [c for c in _V_CHECKS
                if not self.only or any(fnmatch.fnmatchcase(c.id, p) for p in self.only)]

    def run(self, report=None):
        """Run every selected check; ``report(entry)`` is called as each one ends."""
        checks = self.selected()
        order = ([c for c in checks if not c.fresh]
                 + [c for c in checks if c.fresh and not c.destructive]
                 + [c for c in checks if c.destructive])
        results = []
        try:
            for check in order:
                entry = self._run_one(check)
                results.append(entry)
                if report is not None:
                    report(entry)
        finally:
            self._close_session()
        by_id = dict((e["id"], e) for e in results)
        entries = [by_id[c.id] for c in checks]
        summary = dict((r, sum(1 for e in entries if e["result"] == r))
                       for r in _VALIDATE_RESULTS)
        return {"socket": self.path,
                "device_type": None if self.device_type is None
                else self.device_type.name.lower(),
                "features": {"virtio": self.features, "protocol": self.protocol},
                "checks": entries, "summary": summary}

    def _run_one(self, check):
        result, detail = "pass", ""
        try:
            if check.destructive and not self.destructive:
                _vskip("may crash the back-end: run with --destructive")
            if check.fresh:
                self._close_session()
                if self.single is not None:
                    _vskip(self.single)
            detail = check.run(self) or ""
        except _Verdict as exc:
            result, detail = exc.result, exc.detail
        except VhostUserTimeout as exc:
            result, detail = "fail", "no reply in %g s: %s" % (self.timeout, _one_line(exc))
        except Disconnected as exc:
            self._lost = True
            if check.promised:
                result, detail = "fail", ("the back-end hung up on a request it offered: %s"
                                          % _one_line(exc))
            else:
                result, detail = "error", "the back-end went away: %s" % _one_line(exc)
        except (ProtocolError, BackendError, FeatureNotNegotiated) as exc:
            result, detail = "fail", _one_line(exc)
        except (VhostUserError, OSError, ValueError) as exc:
            result, detail = "error", _one_line(exc)
        self._lost = self._lost or result == "error"
        if check.fresh or result == "error" or (
                self._session is not None and self._session.client.broken):
            self._close_session()
        return {"id": check.id, "result": result, "spec": check.spec, "detail": detail}

    # -- connections --------------------------------------------------------------

    def session(self):
        """The shared session: negotiated, with memory, and with the rings I/O needs
        started when the device type has a request this module knows."""
        if self._session is None:
            s = self.fresh()
            try:
                s.memory()
                if self.io_problem(s) is None:
                    s.rings_for_io()
            except BaseException:
                s.close()
                raise
            self._session = s
        return self._session

    def io_session(self):
        """The shared session if it can do I/O, else skip saying why."""
        s = self.session()
        problem = self.io_problem(s)
        if problem:
            _vskip(problem)
        return s

    def fresh(self, io=False, protocol=None, layout=None, regions=None, base=0):
        """A new negotiated connection; with ``io``, memory and started rings too."""
        s = self.connect()
        try:
            s.negotiate(protocol)
            self._learn(s)
            if io:
                problem = self.io_problem(s)
                if problem:
                    _vskip(problem)
                s.memory(**dict((k, w) for k, w in (("layout", layout), ("regions", regions))
                                if w is not None))
                s.rings_for_io(base)
            return s
        except BaseException:
            s.close()
            raise

    def connect(self):
        if self.single is not None:
            _vskip(self.single)
        try:
            s = _VSession(self)
        except Disconnected as exc:
            # Not listening any more after a session that ended well: a back-end
            # that serves one connection. After a failure: it went away.
            if self.features is not None and not self._lost and isinstance(
                    exc.__cause__, (ConnectionRefusedError, FileNotFoundError)):
                self.single = ("the back-end stopped accepting connections after the first "
                               "one (it serves a single connection, as virtiofsd 7.2 does)")
                _vskip(self.single)
            self._lost = True
            raise _Verdict("error", "the back-end went away: %s" % _one_line(exc))
        return s

    def _learn(self, s):
        if self.features is None:
            self.features = s.features
            self.protocol = s.offered_protocol
            if self.device_type is None:
                self.device_type = _guess_device_type(s.features, s.offered_protocol)[0]
        unit = _V_UNITS.get(self.device_type)
        if self.unit is None and unit is not None:
            self.unit = unit(self)

    def io_problem(self, s):
        """Why I/O cannot be checked on ``s``, or None."""
        if self.unit is None:
            return ("no request is known for device type %s: negotiation and config space only"
                    % _v_type_name(self))
        queues = s.client.queue_num
        if queues is not None and queues <= max(self.unit.rings):
            return ("the back-end has %d queue(s), %s I/O needs %d"
                    % (queues, self.device_type.name.lower(), max(self.unit.rings) + 1))
        return None

    def _close_session(self):
        s, self._session = self._session, None
        if s is not None:
            s.close()

    def still_serving(self):
        """After a fault: '' when a new connection is served, else why not."""
        problem = self._still_serving()
        self._lost = self._lost or bool(problem)
        return problem

    def _still_serving(self):
        try:
            s = _VSession(self)
        except Disconnected as exc:
            return "crashed: the socket no longer accepts connections (%s)" % _one_line(exc)
        try:
            s.client.get_features()
            return ""
        except VhostUserTimeout:
            return "hangs: a new connection got no reply in %g s" % self.timeout
        except Disconnected as exc:
            return "crashed: a new connection was dropped unserved (%s)" % _one_line(exc)
        except VhostUserError as exc:
            return "a new connection failed: %s" % _one_line(exc)
        finally:
            s.close()


def _v_type_name(v):
    return "unknown" if v.device_type is None else v.device_type.name.lower()


def _need_protocol(s, bit):
    offered = s.offered_protocol
    if offered is None:
        _vskip("PROTOCOL_FEATURES (bit 30) not offered")
    if not offered & bit:
        _vskip("%s not offered", ProtocolFeature(bit).name)


def _need_feature(s, bit):
    if not s.acked & bit:
        _vskip("%s not offered", VirtioFeature(bit).name)
# -- Negotiation --------------------------------------------------------------

@_vcheck("neg.features", _RS % "Protocol features", promised=True)
def _v_neg_features(v):
    """GET_FEATURES answered first; with bit 30, GET_PROTOCOL_FEATURES before SET_FEATURES.

    The shared session negotiates in exactly that order (as QEMU does), so
    its set-up succeeding is the check.
    """
    s = v.session()
    if s.offered_protocol is None:
        return "GET_FEATURES %#x; PROTOCOL_FEATURES (bit 30) not offered" % s.features
    return ("GET_FEATURES %#x answered first, GET_PROTOCOL_FEATURES %#x before "
            "SET_FEATURES" % (s.features, s.offered_protocol))


@_vcheck("neg.device-bits", "virtio 1.2 2.2, 6")
def _v_neg_device_bits(v):
    """Offered feature bits that neither the transport nor the device type defines."""
    features = v.session().features
    undefined = features & ~_DEVICE_SPECIFIC_FEATURES & ~_V_KNOWN_TRANSPORT
    names = _DEVICE_FEATURE_NAMES.get(v.device_type) if v.device_type is not None else None
    device = features & _DEVICE_SPECIFIC_FEATURES
    if names is not None:
        undefined |= sum(1 << b for b in range(64) if device >> b & 1 and b not in names)
    if undefined:
        _vfail("offers feature bits the %s does not define: %s",
               "device type or the transport" if names is not None else "transport",
               ", ".join(VirtioFeature.names(undefined)))
    return "all %d offered bits are defined%s" % (bin(features).count("1"), (
        "" if names is not None else " by the transport (device bits unchecked: type unknown)"))


#: Protocol features that are meaningless without others.
_V_PROTOCOL_NEEDS = (
    (_P.BACKEND_SEND_FD, _P.BACKEND_REQ), (_P.HOST_NOTIFIER, _P.BACKEND_REQ),
    (_P.INBAND_NOTIFICATIONS, _P.BACKEND_REQ | _P.REPLY_ACK),
    (_P.GET_VRING_BASE_INFLIGHT, _P.INFLIGHT_SHMFD),
    (_P.GET_VRING_BASE_SKIP_DRAIN, _P.GET_VRING_BASE_INFLIGHT | _P.INFLIGHT_SHMFD),
)


@_vcheck("neg.protocol-bits", _RS % "Protocol features")
def _v_neg_protocol_bits(v):
    """Protocol bits the spec does not define, or offered without what they need."""
    s = v.session()
    _need_feature(s, VirtioFeature.PROTOCOL_FEATURES)
    offered = s.offered_protocol
    if offered & ~_V_KNOWN_PROTOCOL:
        _vfail("offers undefined protocol bits: %s",
               ", ".join(ProtocolFeature.names(offered & ~_V_KNOWN_PROTOCOL)))
    for bit, needs in _V_PROTOCOL_NEEDS:
        if offered & bit and needs & ~offered:
            _vfail("offers %s without %s", bit.name,
                   " and ".join(ProtocolFeature.names(needs & ~offered)))
    return " ".join(ProtocolFeature.names(offered))


@_vcheck("neg.reply-ack", _RS % "Communication" + ", REPLY_ACK", promised=True)
def _v_neg_reply_ack(v):
    """Every request sent with NEED_REPLY during set-up got its u64 ack."""
    s = v.session()
    if s.offered_protocol is None or not s.offered_protocol & _P.REPLY_ACK:
        _vskip("REPLY_ACK not offered")
    return "%d requests sent with NEED_REPLY, each acked: %s" % (
        len(s.acks), " ".join(sorted(set(r.name for r in s.acks))))


def _v_raw_ack(client, code):
    """Send request ``code`` (any int) with NEED_REPLY; its u64 ack, or None on EOF."""
    channel, what = client._channel, "request %d" % code
    try:
        channel.send(code, _VERSION | _FLAG_NEED_REPLY, b"", ())
        got, flags, size, fds = channel.recv_header(what)
        _close_fds(fds)
        body = channel.recv_body(size, what)
    except Disconnected:
        return None
    if got != code or size != _U64.size:
        _vfail("reply to request %d: code %d with %d bytes, expected the code and a u64",
               code, got, size)
    return _U64.unpack(body)[0]


@_vcheck("neg.unsupported", _RS % "Communication", fresh=True)
def _v_neg_unsupported(v):
    """A request no spec defines is refused: an error ack or a hang-up, never ack 0."""
    with v.fresh() as s:
        if not s.ack:
            _vskip("REPLY_ACK not offered: a refusal cannot be observed")
        value = _v_raw_ack(s.client, _V_UNSUPPORTED)
        if value:
            return "request %#x refused with error %d" % (_V_UNSUPPORTED, value)
        if value is None or not s.alive():
            gone = v.still_serving()
            if gone:
                _vfail("after request %#x: %s", _V_UNSUPPORTED, gone)
            return ("request %#x: %sconnection dropped, the back-end still serves"
                    % (_V_UNSUPPORTED, "" if value is None else "acked 0, then "))
        _vfail("request %#x, which no spec defines, acked as a success (0)", _V_UNSUPPORTED)
# -- Protocol features backed by their requests ---------------------------------

@_vcheck("proto.mq", _RS % "Multiple queue support", promised=True)
def _v_proto_mq(v):
    s = v.session()
    _need_protocol(s, _P.MQ)
    n = s.client.queue_num
    need = {DeviceType.NET: 2}.get(v.device_type, _MIN_QUEUES.get(v.device_type, 1))
    if not 1 <= n <= MAX_VRINGS:
        _vfail("GET_QUEUE_NUM %d is outside 1..%d", n, MAX_VRINGS)
    if n < need:
        _vfail("GET_QUEUE_NUM %d, a %s device has at least %d", n,
               v.device_type.name.lower(), need)
    if v.device_type == DeviceType.BLOCK and s.acked & _BLK_F_MQ and s.protocol & _P.CONFIG:
        num_queues = struct.unpack_from("<H", s.client.get_config(0, 36), 34)[0]
        if num_queues > n:
            _vfail("config num_queues %d, but GET_QUEUE_NUM %d", num_queues, n)
        return "GET_QUEUE_NUM %d, config num_queues %d" % (n, num_queues)
    return "GET_QUEUE_NUM %d" % n


@_vcheck("proto.config", _RS % "Front-end message types" + ", GET_CONFIG", promised=True)
def _v_proto_config(v):
    s = v.session()
    _need_protocol(s, _P.CONFIG)
    # As QEMU: the layout's size for the offered features (what exists).
    size = _device_config_size(v.device_type, s.features) if v.device_type else 0
    if not size:
        _vskip("the config layout of device type %s is not known here", _v_type_name(v))
    data = s.client.get_config(0, size)
    detail = "GET_CONFIG of %d bytes answered" % size
    at = size // 2
    window = s.client.get_config(at, size - at)
    if window == data[:size - at]:
        _vfail("GET_CONFIG of %d bytes at offset %d answered the bytes at offset 0: it ignored "
               "the offset", size - at, at)
    if window != data[at:]:
        _vfail("GET_CONFIG of %d bytes at offset %d answered %s..., the bytes there are %s...",
               size - at, at, window[:8].hex(), data[at:at + 8].hex())
    detail += ", and its second half at offset %d" % at
    if v.device_type == DeviceType.BLOCK and s.acked & _BLK_F_CONFIG_WCE:
        s.client.set_config(32, data[32:33], ack=s.ack)
        again = s.client.get_config(0, size)
        if again[32:33] != data[32:33]:
            _vfail("SET_CONFIG of writeback %d read back as %d", bytearray(data)[32],
                   bytearray(again)[32])
        detail += "; SET_CONFIG of writeback %s" % ("acked" if s.ack else "kept")
    return detail


@_vcheck("proto.log", _RS % "Migration" + ", SET_LOG_BASE", promised=True)
def _v_proto_log(v):
    s = v.session()
    _need_protocol(s, _P.LOG_SHMFD)
    size = max(_PAGE_SIZE, -(-s.mem.size // (_PAGE_SIZE * 8)))
    fd = _memfd_create("vhost-user-validate-log", size)
    try:
        s.client.set_log_base(size, 0, fd)
    finally:
        os.close(fd)
    return "SET_LOG_BASE with a %d-byte log answered" % size


@_vcheck("proto.status", _RS % "Front-end message types" + ", SET_STATUS", promised=True)
def _v_proto_status(v):
    s = v.session()
    _need_protocol(s, _P.STATUS)
    status = 1 | 2 | 8 | 4          # ACKNOWLEDGE DRIVER FEATURES_OK DRIVER_OK
    s.client.set_status(status, ack=s.ack)
    got = s.client.get_status()
    if got & status != status:
        _vfail("SET_STATUS %#x, then GET_STATUS answered %#x", status, got)
    return "SET_STATUS %#x read back as %#x" % (status, got)


@_vcheck("proto.shmem", _RS % "Front-end message types" + ", GET_SHMEM_CONFIG", promised=True)
def _v_proto_shmem(v):
    s = v.session()
    _need_protocol(s, _P.SHMEM)
    config = s.client.get_shmem_config()
    bad = [size for size in config.sizes if size % _PAGE_SIZE]
    if bad:
        _vfail("shared memory region sizes %s are not page multiples", bad)
    return "GET_SHMEM_CONFIG: %d region(s)" % len([x for x in config.sizes if x])


@_vcheck("proto.inflight", _RS % "Inflight I/O tracking", fresh=True, promised=True)
def _v_proto_inflight(v):
    with v.fresh() as s:
        _need_protocol(s, _P.INFLIGHT_SHMFD)
        queues = s.client.queue_num or 1
        info, fd = s.client.get_inflight_fd(queues, _V_RING)
        if fd is None:
            _vfail("GET_INFLIGHT_FD returned an empty area and no fd")
        try:
            s.client.set_inflight_fd(info, fd, ack=s.ack)
        finally:
            os.close(fd)
        return "GET_INFLIGHT_FD: %d bytes for %d queue(s); SET_INFLIGHT_FD accepted" \
            % (info.mmap_size, queues)


@_vcheck("proto.device-state", _RS % "Migrating back-end state", fresh=True, promised=True)
def _v_proto_device_state(v):
    with v.fresh() as s:
        _need_protocol(s, _P.DEVICE_STATE)
        read_fd, write_fd = os.pipe()
        fds = [read_fd, write_fd]
        try:
            fd = s.client.set_device_state_fd(TRANSFER_SAVE, TRANSFER_PHASE_STOPPED, write_fd)
            os.close(write_fd)
            fds.remove(write_fd)
            if fd is not None:
                fds.append(fd)
            source = read_fd if fd is None else fd
            deadline, total = time.monotonic() + v.timeout, 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([source], [], [], left)[0]:
                    _vfail("no reply in %g s: the state stream never ended", v.timeout)
                chunk = os.read(source, 65536)
                if not chunk:
                    break
                total += len(chunk)
            s.client.check_device_state()
        finally:
            _close_fds(fds)
        return "saved %d bytes of state; CHECK_DEVICE_STATE 0" % total


@_vcheck("proto.backend-req", _RS % "Back-end communication", fresh=True, promised=True)
def _v_proto_backend_req(v):
    """BACKEND_REQ: SET_BACKEND_REQ_FD accepted, and the connection still answers."""
    with v.connect() as s:
        s.negotiate(_V_PROTOCOL | _P.BACKEND_REQ)
        _need_protocol(s, _P.BACKEND_REQ)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.client.set_backend_req_fd(theirs, ack=s.ack)
            theirs.close()
            s.client.get_features()
        finally:
            ours.close()
            theirs.close()
        return "SET_BACKEND_REQ_FD %s" % ("acked" if s.ack else "taken")


@_vcheck("proto.reset-device", _RS % "Front-end message types" + ", RESET_DEVICE",
         fresh=True, promised=True)
def _v_proto_reset_device(v):
    """RESET_DEVICE with rings running, then the device is set up again and serves."""
    with v.fresh() as s:
        _need_protocol(s, _P.RESET_DEVICE)
        problem = v.io_problem(s)
        if not problem:
            s.memory()
            s.rings_for_io()
        s.client.reset_device(ack=s.ack)
        if problem:
            s.client.get_features()
            return "RESET_DEVICE %s (%s)" % ("acked" if s.ack else "taken", problem)
        s.client.set_features(s.acked, ack=s.ack)
        s.client.set_mem_table(s.mem.regions(), ack=s.ack)
        for i in sorted(s.rings):
            s.rings[i].set_base(0)
            s.start(s.rings[i], 0)
        return "RESET_DEVICE, then set up again: " + _v_io_roundtrip(v, s)


@_vcheck("mem.slots", _RS % "Memory access" + ", ADD_MEM_REG", promised=True)
def _v_mem_slots(v):
    s = v.session()
    _need_protocol(s, _P.CONFIGURE_MEM_SLOTS)
    slots = s.client.get_max_mem_slots()
    if slots < 1:
        _vfail("GET_MAX_MEM_SLOTS %d", slots)
    extra = GuestMemory([(_V_REGION1, 1 << 20)], "vhost-user-validate-extra")
    s.extra_mem.append(extra)
    (region, fd), = extra.regions()
    s.client.add_mem_reg(region, fd, ack=s.ack)
    detail = "GET_MAX_MEM_SLOTS %d; ADD_MEM_REG" % slots
    if s.rings and isinstance(v.unit, _VBlockUnit):
        status, data = v.unit.request(s, _BLK_T_IN, 0, length=512, mem=extra)
        if status != 0:
            _vfail("a READ into the region ADD_MEM_REG added: status %d", status)
        detail += ", a READ into it"
    s.client.rem_mem_reg(region, ack=s.ack)
    return detail + ", REM_MEM_REG accepted"
# -- Rings ------------------------------------------------------------------------

@_vcheck("ring.sizes", "virtio 1.2 2.7; " + _RS % "Front-end message types", fresh=True)
def _v_ring_sizes(v):
    """Sizes 1, 256 and 32768 accepted, 1000 refused: split rings are powers of 2."""
    with v.fresh() as s:
        if not s.ack:
            _vskip("REPLY_ACK not offered: acceptance cannot be observed")
        for size in (1, 256, 32768):
            s.client.set_vring_num(0, size, ack=True)
        try:  # sent raw: the client itself refuses a size that is not a power of 2
            s.client._transact(_F.SET_VRING_NUM, _STATE.pack(0, 1000), ack=True)
        except BackendError:
            return "1, 256 and 32768 accepted; 1000 refused"
        except Disconnected:
            return "1, 256 and 32768 accepted; 1000 refused by dropping the connection"
        if not s.alive():
            return "1, 256 and 32768 accepted; 1000 acked 0, then the connection dropped"
        _vfail("SET_VRING_NUM 1000 acked 0 on a split ring (a queue size is a power of 2)")


def _v_post(v, s, ring, **kwargs):
    return v.unit.post(s, ring, **kwargs)


@_vcheck("ring.base", _RS % "Front-end message types" + ", SET_VRING_BASE", fresh=True)
def _v_ring_base(v):
    """SET_VRING_BASE near the 16-bit wrap honoured; GET_VRING_BASE returns where it stopped."""
    base = 0xFFFE
    with v.fresh(io=True, base=base) as s:
        ring = s.rings[v.unit.ring]
        heads = [_v_post(v, s, ring) for _ in range(4)]
        used = ring.wait_used(4, v.timeout, "chains posted after SET_VRING_BASE %d" % base)
        if sorted(h for h, _ in used) != sorted(heads):   # any completion order
            _vfail("used heads %s, posted %s", sorted(h for h, _ in used), sorted(heads))
        if ring.used_idx != (base + 4) & 0xFFFF:
            _vfail("used->idx %d after 4 chains from base %d", ring.used_idx, base)
        got = s.client.get_vring_base(ring.index)
        if got != (base + 4) & 0xFFFF:
            _vfail("GET_VRING_BASE %d, expected %d", got, (base + 4) & 0xFFFF)
        return "4 chains served from avail index %d across the wrap; GET_VRING_BASE %d" \
            % (base, got)


@_vcheck("ring.stop", _RS % "Ring states" + ", GET_VRING_BASE", fresh=True)
def _v_ring_stop(v):
    """GET_VRING_BASE stops the ring, returns the next avail index, and the ring resumes there."""
    with v.fresh(io=True) as s:
        ring = s.rings[v.unit.ring]
        _v_post(v, s, ring)
        _v_post(v, s, ring)
        ring.wait_used(2, v.timeout, "two chains")
        got = s.client.get_vring_base(ring.index)
        if got != 2:
            _vfail("GET_VRING_BASE %d after 2 chains, expected 2 (the next avail index)", got)
        head = _v_post(v, s, ring)
        if not ring.idle_for(min(_V_GRACE, v.timeout)):
            _vfail("a chain posted after GET_VRING_BASE was processed: the ring did not stop")
        s.start(ring, got)
        (used_head, _), = ring.wait_used(1, v.timeout, "the chain posted while stopped, after "
                                         "restarting at %d" % got)
        if used_head != head:
            _vfail("after restarting at %d the used entry is for descriptor %d, not %d: the "
                   "ring did not resume where it stopped", got, used_head, head)
        if ring.used_idx != 3:
            _vfail("used->idx %d after restarting, expected 3", ring.used_idx)
        return "stopped at 2, nothing processed while stopped, resumed at 2"


@_vcheck("ring.enable", _RS % "Ring states" + ", SET_VRING_ENABLE", fresh=True)
def _v_ring_enable(v):
    """A chain on a disabled ring has no effect; it is served once the ring is enabled."""
    with v.fresh(io=True) as s:
        if not s.acked & VirtioFeature.PROTOCOL_FEATURES:
            _vskip("PROTOCOL_FEATURES not negotiated: rings are enabled at once")
        ring = s.rings[v.unit.ring]
        s.client.set_vring_enable(ring.index, False, ack=s.ack)
        if isinstance(v.unit, _VNetUnit):
            rx = s.rings[0]
            v.unit.fill_rx(s, 1)
        blk = isinstance(v.unit, _VBlockUnit) and not s.acked & _BLK_F_RO
        if blk:  # a WRITE: reaching the disk is a side effect nobody can argue with
            s.client.set_vring_enable(ring.index, True, ack=s.ack)
            old = v.unit.request(s, _BLK_T_IN, _V_SECTOR, length=4096)[1]
            s.client.set_vring_enable(ring.index, False, ack=s.ack)
            head = v.unit.request(s, _BLK_T_OUT, _V_SECTOR, data=bytes(bytearray(
                [0x5a]) * 4096), wait=False)
        else:
            head = _v_post(v, s, ring)
        try:
            if isinstance(v.unit, _VNetUnit):
                if not rx.idle_for(min(_V_GRACE, v.timeout)):
                    _vfail("a frame sent on the disabled TX ring came back on RX")
            elif not ring.idle_for(min(_V_GRACE, v.timeout)):
                _vfail("a %s on the disabled ring %d was served", "WRITE" if blk else "chain",
                       ring.index)
            s.client.set_vring_enable(ring.index, True, ack=s.ack)
            ring.kick.signal()
            (used_head, _), = ring.wait_used(1, v.timeout, "the chain, after "
                                             "SET_VRING_ENABLE 1")
            if used_head != head:
                _vfail("used entry for descriptor %d, expected %d", used_head, head)
        finally:
            if blk:
                ring.used_seen = ring.used_idx
                s.client.set_vring_enable(ring.index, True, ack=s.ack)
                v.unit.request(s, _BLK_T_OUT, _V_SECTOR, data=old)
        return "nothing served while disabled; served once enabled"


@_vcheck("ring.event-idx", "virtio 1.2 2.7.7, 2.7.10", fresh=True)
def _v_ring_event_idx(v):
    """No call before used_event is crossed, a call when it is; avail_event obeyed."""
    with v.fresh(io=True) as s:
        _need_feature(s, VirtioFeature.RING_EVENT_IDX)
        ring = s.rings[v.unit.ring]
        grace = min(_V_GRACE, v.timeout)
        # First a chain that crosses used_event: it MUST be signalled. (Also
        # Linux vhost and libvhost-user signal the first chain after a start
        # whatever used_event says; the spec only says SHOULD NOT there.)
        ring.set_used_event(ring.used_seen)
        _v_post(v, s, ring)
        ring.wait_used(1, v.timeout)
        if not ring.call.wait(v.timeout):
            _vfail("no interrupt in %g s although used_event was crossed", v.timeout)
        ring.set_used_event(ring.used_seen + 100)
        ring.call.read()
        _v_post(v, s, ring)
        ring.wait_used(1, v.timeout)
        if ring.call.wait(grace):
            _vfail("an interrupt although used_event (%d) was not crossed (SHOULD NOT)",
                   (ring.used_seen + 99) & 0xFFFF)
        # The device asks for kicks through avail_event: a chain it said needs
        # no kick must still be served (it polls), one that needs one gets it.
        old = ring.avail_idx
        event = ring.avail_event
        ring.kick.close()
        ring.kick = Event()   # a kick fd the device does not see: we do not kick
        kick_due = _need_event(event, (old + 1) & 0xFFFF, old)
        if kick_due:
            s.client.set_vring_kick(ring.index, ring.kick, ack=s.ack)
        _v_post(v, s, ring)
        ring.wait_used(1, v.timeout, "a chain %s" % ("kicked as avail_event %d asked" % event
                                                      if kick_due else
                                                      "not kicked, as avail_event %d allowed"
                                                      % event))
        return "used_event honoured both ways; avail_event %d %s" % (
            event, "asked for the kick" if kick_due else "suppressed the kick, chain served")


@_vcheck("ring.indirect", "virtio 1.2 2.7.5.3")
def _v_ring_indirect(v):
    s = v.io_session()
    _need_feature(s, VirtioFeature.RING_INDIRECT_DESC)
    return _v_io_roundtrip(v, s, indirect=True) + " through indirect tables"


def _v_io_roundtrip(v, s, indirect=False, mem=None):
    """One request that proves data moved correctly, per type; returns a detail."""
    unit = v.unit
    if isinstance(unit, _VBlockUnit):
        if s.acked & _BLK_F_RO:
            status, _ = unit.request(s, _BLK_T_IN, 0, length=512, mem=mem, indirect=indirect)
            if status:
                _vfail("READ status %d", status)
            return "READ of a read-only disk"
        return _v_blk_write_read(v, s, mem=mem, indirect=indirect)
    if isinstance(unit, _VNetUnit):
        return _v_net_echo(v, s, mem=mem, indirect=indirect)
    if not s.fuse_ready:
        s.fuse_ready = not unit.init(s)[0]
    error, payload = unit.fuse(s, _FuseOp.GETATTR, _FUSE_ROOT_ID, unit.getattr_args(),
                               _FUSE_ATTR_OUT.size + _FUSE_ATTR.size, indirect=indirect)
    if error:
        _vfail("GETATTR of the root: error %d", error)
    return "GETATTR of the root answered"


def _v_blk_write_read(v, s, mem=None, indirect=False):
    unit = v.unit
    status, old = unit.request(s, _BLK_T_IN, _V_SECTOR, length=4096, mem=mem)
    if status:
        _vfail("READ of sector %d: status %d", _V_SECTOR, status)
    pattern = os.urandom(4096)
    try:
        status, _ = unit.request(s, _BLK_T_OUT, _V_SECTOR, data=pattern, mem=mem,
                                 indirect=indirect)
        if status:
            _vfail("WRITE of sector %d: status %d", _V_SECTOR, status)
        status, back = unit.request(s, _BLK_T_IN, _V_SECTOR, length=4096, mem=mem,
                                    indirect=indirect)
        if status or back != pattern:
            _vfail("READ after WRITE of sector %d: status %d, %s", _V_SECTOR, status,
                   "data matches" if back == pattern else "different data")
    finally:
        unit.request(s, _BLK_T_OUT, _V_SECTOR, data=old, mem=mem)
    return "4 KiB written at sector %d and read back (old data restored)" % _V_SECTOR


def _v_net_echo(v, s, mem=None, indirect=False):
    unit = v.unit
    rx = s.rings[0]
    bufs = unit.fill_rx(s, 1)
    tag = os.urandom(8)
    unit.post(s, s.rings[1], indirect=indirect, mem=mem, tag=tag)
    s.rings[1].wait_used(1, v.timeout, "the TX frame")
    deadline = time.monotonic() + v.timeout
    while rx.used_idx == rx.used_seen:
        if time.monotonic() > deadline:
            _vskip("no frame came back on RX in %g s: the back-end does not loop frames "
                   "back", v.timeout)
        time.sleep(0.0005)
    (_, length), = rx.wait_used(1, v.timeout)
    frame = s.mem.read(bufs[0], length)[_NET_HDR.size:]
    if frame != unit.sent:
        _vfail("the frame that came back on RX is not the one sent (%d bytes, %s)", length,
               "its own tag" if tag in frame else "another frame")
    return "a %d-byte frame echoed" % length


@_vcheck("mem.regions", _RS % "Memory access" + "; virtio 1.2 2.7.5", fresh=True, promised=True)
def _v_mem_regions(v):
    """A chain whose buffers lie in two regions (rings in the first, data in the second)."""
    with v.fresh() as s:
        problem = v.io_problem(s)
        if problem:
            _vskip(problem)
        mem = s.memory(layout=((0, 1 << 20), (_V_REGION1, 1 << 20)))
        s.rings_for_io()
        data_mem = _VSplitAlloc(mem, _V_REGION1)
        return _v_io_roundtrip(v, s, mem=data_mem) + ", data in the region at %#x" \
            % _V_REGION1


@_vcheck("mem.offset", _RS % "Memory access" + ", mmap_offset", fresh=True, promised=True)
def _v_mem_offset(v):
    """A region at a non-zero guest address mapped from a non-zero offset of its fd."""
    skip = 0x10000
    with v.fresh() as s:
        problem = v.io_problem(s)
        if problem:
            _vskip(problem)

        def regions(mem):
            table = mem.regions()
            (r0, fd0), (r1, fd1) = table
            return [(r0, fd0), (MemoryRegion(r1.guest_phys_addr + skip, r1.memory_size - skip,
                                             r1.userspace_addr + skip, skip), fd1)]
        mem = s.memory(layout=((0, 1 << 20), (_V_REGION1, 1 << 20)), regions=regions)
        s.rings_for_io()
        data_mem = _VSplitAlloc(mem, _V_REGION1 + skip)
        return _v_io_roundtrip(v, s, mem=data_mem) + \
            ", data at GPA %#x, mmap_offset %#x" % (_V_REGION1 + skip, skip)


class _VSplitAlloc:
    """``mem`` whose ``allocate`` puts data at or above ``floor`` (a region of its own)."""

    def __init__(self, mem, floor):
        self._mem, self._next = mem, floor

    def allocate(self, size, align=16):
        addr = -(-self._next // align) * align
        self._next = addr + size
        return addr

    def __getattr__(self, name):
        return getattr(self._mem, name)


@_vcheck("mem.replace", _RS % "Memory access" + ", SET_MEM_TABLE", fresh=True, promised=True)
def _v_mem_replace(v):
    """A new memory table (the rings' region plus a new one) while the rings are stopped."""
    with v.fresh(io=True) as s:
        work = s.rings[v.unit.ring]
        _v_post(v, s, work)
        work.wait_used(1, v.timeout)
        bases = dict((i, s.client.get_vring_base(i)) for i in sorted(s.rings))
        # libvhost-user re-maps started rings at once, so their region stays.
        extra = GuestMemory([(_V_REGION1, 1 << 20)], "vhost-user-validate-new")
        s.extra_mem.append(extra)
        s.client.set_mem_table(s.mem.regions() + extra.regions(), ack=s.ack)
        for i in sorted(s.rings):
            s.start(s.rings[i], bases[i])
        return _v_io_roundtrip(v, s, mem=extra) + \
            ", in a region a new SET_MEM_TABLE added while the rings were stopped"
# -- Device I/O (shared session) --------------------------------------------------

def _v_blk_session(v):
    s = v.io_session()
    if not isinstance(v.unit, _VBlockUnit):
        _vskip("not a block device")
    return s


@_vcheck("io.blk-rw", "virtio 1.2 5.2.6")
def _v_io_blk_rw(v):
    s = _v_blk_session(v)
    if s.acked & _BLK_F_RO:
        _vskip("BLK_RO: the disk is read-only")
    return _v_blk_write_read(v, s)


@_vcheck("io.blk-flush", "virtio 1.2 5.2.6")
def _v_io_blk_flush(v):
    s = _v_blk_session(v)
    if not s.acked & _BLK_F_FLUSH:
        _vskip("BLK_FLUSH not offered")
    status, _ = v.unit.request(s, _BLK_T_FLUSH)
    if status:
        _vfail("FLUSH status %d", status)
    return "FLUSH status OK"


@_vcheck("io.blk-discard", "virtio 1.2 5.2.6")
def _v_io_blk_discard(v):
    s = _v_blk_session(v)
    done = []
    for bit, kind, name in ((_BLK_F_DISCARD, _BLK_T_DISCARD, "DISCARD"),
                            (_BLK_F_WRITE_ZEROES, _BLK_T_WRITE_ZEROES, "WRITE_ZEROES")):
        if not s.acked & bit or s.acked & _BLK_F_RO:
            continue
        status, old = v.unit.request(s, _BLK_T_IN, _V_SECTOR, length=4096)
        try:
            if kind == _BLK_T_WRITE_ZEROES:  # something to zero
                v.unit.request(s, _BLK_T_OUT, _V_SECTOR, data=b"\x5a" * 4096)
            status = v.unit.request(s, kind, data=_BLK_DISCARD_SEG.pack(_V_SECTOR, 8, 0))[0]
            if status:
                _vfail("%s of 8 sectors at %d: status %d", name, _V_SECTOR, status)
            if kind == _BLK_T_WRITE_ZEROES:
                back = v.unit.request(s, _BLK_T_IN, _V_SECTOR, length=4096)[1]
                if back != bytes(4096):
                    _vfail("sectors read back non-zero after WRITE_ZEROES")
        finally:
            v.unit.request(s, _BLK_T_OUT, _V_SECTOR, data=old)
        done.append(name)
    if not done:
        _vskip("neither BLK_DISCARD nor BLK_WRITE_ZEROES offered on a writable disk")
    return " and ".join(done) + " served (old data restored)"


@_vcheck("io.blk-id", "virtio 1.2 5.2.6")
def _v_io_blk_id(v):
    s = _v_blk_session(v)
    status, data = v.unit.request(s, _BLK_T_GET_ID, length=_BLK_ID_BYTES)
    if status == 2:
        _vskip("GET_ID answered UNSUPP")
    if status:
        _vfail("GET_ID status %d", status)
    return "GET_ID %r" % data.split(b"\0", 1)[0].split(b"\xa5", 1)[0].decode("ascii", "replace")


@_vcheck("io.blk-bounds", "virtio 1.2 5.2.6.1")
def _v_io_blk_bounds(v):
    """The last sector of config capacity reads OK; the one past it is refused."""
    s = _v_blk_session(v)
    if not s.protocol & _P.CONFIG:
        _vskip("CONFIG not negotiated: capacity unknown")
    capacity = struct.unpack("<Q", s.client.get_config(0, 8))[0]
    status, _ = v.unit.request(s, _BLK_T_IN, capacity - 1, length=512)
    if status:
        _vfail("READ of the last sector (%d): status %d", capacity - 1, status)
    status, _ = v.unit.request(s, _BLK_T_IN, capacity, length=512)
    if status == 0:
        _vfail("READ past capacity (sector %d) answered OK", capacity)
    return "capacity %d sectors: last sector OK, past it status %d" % (capacity, status)


@_vcheck("io.net-echo", "virtio 1.2 5.1.6")
def _v_io_net_echo(v):
    s = v.io_session()
    if not isinstance(v.unit, _VNetUnit):
        _vskip("not a net device")
    return _v_net_echo(v, s)


@_vcheck("io.fs", "virtio 1.2 5.11.6")
def _v_io_fs(v):
    s = v.io_session()
    if not isinstance(v.unit, _VFsUnit):
        _vskip("not a virtio-fs device")
    error, payload = v.unit.init(s)
    if error:
        _vfail("FUSE_INIT error %d", error)
    s.fuse_ready = True
    major, minor = struct.unpack_from("<II", payload)
    if major != _FUSE_MAJOR:
        _vfail("FUSE_INIT answered major %d, asked 7", major)
    error, payload = v.unit.fuse(s, _FuseOp.GETATTR, _FUSE_ROOT_ID, v.unit.getattr_args(),
                                 _FUSE_ATTR_OUT.size + _FUSE_ATTR.size)
    if error:
        _vfail("GETATTR of the root: error %d", error)
    mode = _FUSE_ATTR.unpack_from(payload, _FUSE_ATTR_OUT.size)[9]
    if not stat.S_ISDIR(mode):
        _vfail("the root's mode %o is not a directory", mode)
    error, payload = v.unit.fuse(s, _FuseOp.LOOKUP, _FUSE_ROOT_ID, b".\0",
                                 _FUSE_ENTRY_OUT.size + _FUSE_ATTR.size)
    return "FUSE %d.%d; root is a directory (mode %o); LOOKUP \".\" error %d" % (
        major, minor, mode, error)
# -- Recovery ------------------------------------------------------------------------

@_vcheck("recover.reconnect", _RS % "Communication" + ', "Inflight I/O tracking"', fresh=True,
         promised=True)
def _v_recover(v):
    """A connection dropped with chains in flight; the next connection is served."""
    with v.fresh(io=True) as s:
        for _ in range(4):
            _v_post(v, s, s.rings[v.unit.ring])
    try:
        with v.fresh(io=True) as s:
            detail = _v_io_roundtrip(v, s)
    except Disconnected as exc:
        gone = v.still_serving()
        if not gone:
            raise
        # qemu-storage-daemon 7.2 sometimes aborts here (vhost_user_server_ref asserts
        # !server->wait_idle: the old connection's requests were still draining).
        _vfail("a connection dropped with 4 chains in flight, then the back-end hung up on "
               "the next: %s; %s",
               _one_line(exc), gone)
    inflight = v.protocol is not None and v.protocol & _P.INFLIGHT_SHMFD
    return "dropped with 4 chains posted; the next connection served: %s%s" % (
        detail, "" if inflight else " (INFLIGHT_SHMFD not offered: no resubmission to check)")
# -- Robustness (--destructive) ----------------------------------------------------------

def _v_fault(v, what, inject):
    """Inject a fault on a fresh connection; pass when the back-end still serves others."""
    s = v.fresh(io=True)
    try:
        outcome = inject(s) or ""
        if not outcome:
            outcome = "kept the connection" if s.alive() else "dropped the connection"
    except (Disconnected, ProtocolError):
        outcome = "dropped the connection"
    finally:
        s.close()
    gone = v.still_serving()
    if gone:
        _vfail("after %s: %s", what, gone)
    return "%s: %s, and still serves" % (what, outcome)


def _v_bad_chain(v, what, build):
    """Publish what ``build(s, ring)`` wrote ((heads, extra avail->idx move)), kick, then judge."""
    def inject(s):
        ring = s.rings[v.unit.ring]
        heads, jump = build(s, ring)
        ring.publish(*heads, jump=jump)
        ring.kick.signal()
        ring.idle_for(min(_V_GRACE / 3, v.timeout))  # a moment with the bad chain
    return _v_fault(v, what, inject)


def _v_looped(s, ring):
    buf = s.mem.allocate(64, 16)
    ring.raw_desc(0, buf, 64, _DESC_F_NEXT, 1)
    ring.raw_desc(1, buf, 64, _DESC_F_NEXT, 0)
    return (0,), 0


def _v_outside(s, ring):
    ring.raw_desc(0, 0x7F0000000000, 4096, 0, 0)
    return (0,), 0


@_vcheck("robust.loop", "virtio 1.2 2.7.5.2", fresh=True, destructive=True)
def _v_robust_loop(v):
    return _v_bad_chain(v, "a looped chain", _v_looped)


@_vcheck("robust.outside", "virtio 1.2 2.7.5.2", fresh=True, destructive=True)
def _v_robust_outside(v):
    return _v_bad_chain(v, "a descriptor outside guest memory", _v_outside)


@_vcheck("robust.avail-jump", "virtio 1.2 2.7.6", fresh=True, destructive=True)
def _v_robust_avail_jump(v):
    return _v_bad_chain(v, "avail->idx moved by more than the ring size",
                        lambda s, ring: ((), ring.size + 5))


@_vcheck("robust.truncated", _RS % "Message specification", fresh=True, destructive=True)
def _v_robust_truncated(v):
    def inject(s):
        sock = s.client._channel.sock
        sock.sendall(struct.pack("<III", _F.SET_VRING_ADDR, _VERSION, 40) + bytes(8))
        sock.shutdown(socket.SHUT_WR)
        ready = select.select([sock], [], [], v.timeout)[0]
        return "dropped the connection" if ready else "left the connection open"
    return _v_fault(v, "a message cut short (40 bytes announced, 8 sent)", inject)
# -- Output -----------------------------------------------------------------------------

def _validate_table(report):
    rows = [("RESULT", "ID", "SPEC", "DETAIL")] + [
        (e["result"], e["id"], e["spec"], e["detail"]) for e in report["checks"]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["%s: %s device, features %s, protocol features %s" % (
        report["socket"], report["device_type"] or "unknown",
        "-" if report["features"]["virtio"] is None else "%#x" % report["features"]["virtio"],
        "-" if report["features"]["protocol"] is None
        else "%#x" % report["features"]["protocol"])]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3])
    lines.append(_validate_summary(report))
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _validate_summary(report):
    total = report["summary"]
    return "%d checks: %s" % (sum(total.values()), ", ".join(
        "%d %s" % (total[r], r) for r in _VALIDATE_RESULTS))


def _validate_tap(report):
    lines = ["TAP version 13", "1..%d" % len(report["checks"])]
    for n, e in enumerate(report["checks"], 1):
        ok = "not ok" if e["result"] in ("fail", "error") else "ok"
        line = "%s %d - %s" % (ok, n, e["id"])
        if e["result"] == "skip":
            line += " # SKIP %s" % e["detail"]
        lines.append(line)
        if e["result"] != "skip":
            lines += ["  ---", "  result: %s" % e["result"], "  spec: '%s'"
                      % e["spec"].replace("'", "''"), "  detail: '%s'"
                      % e["detail"].replace("'", "''"), "  ..."]
    lines.append("# " + _validate_summary(report))
    return "\n".join(lines) + "\n"


def _one_line(exc):
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


############################################################################
# Bench ####################################################################
############################################################################

# -- Shared with the command line ------------------------------------------------

_PROG = "vhost_user_frontend"


class _CliError(Exception):
    """A failure the command line reports as one line, without a traceback."""


class _UsageError(_CliError):
    """Options that do not go together, found before anything is sent: status 2, as argparse's."""

def _check_device_type(path, wanted, features, protocol_features):
    """Raise _CliError when the back-end is conclusively not a ``wanted`` device."""
    guess, why, conclusive = _guess_device_type(features, protocol_features)
    if conclusive and guess is not None and guess != wanted:
        raise _CliError("%s: wrong device type: the back-end is a %s device (it %s), not %s"
                        % (path, guess.name.lower(), why, wanted.name.lower()))


def _check_socket(path):
    """Refuse a missing path or a non-socket in one line, before connecting."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise _CliError("%s: no such socket" % path)
    except OSError as exc:
        raise _CliError("%s: %s" % (path, exc.strerror))
    import stat
    if not stat.S_ISSOCK(mode):
        raise _CliError("%s: not a unix socket" % path)


def _cli_connect(path, timeout):
    """A BackendClient on ``path``, with one-line errors for the usual mistakes.

    A listen backlog that is full (the back-end busy with other front-ends,
    or stopped) is retried until ``timeout``, as the library does; a missing
    socket or one nobody listens on fails at once.
    """
    _check_socket(path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            # timeout=0: one attempt each; the CLI must not wait for a socket to appear.
            return BackendClient.connect(path, timeout=0, reply_timeout=timeout)
        except Disconnected as exc:
            cause = exc.__cause__
            busy = isinstance(cause, (BlockingIOError, socket.timeout))
            if busy and time.monotonic() < deadline:
                time.sleep(min(_RECONNECT_RETRY, max(0.0, deadline - time.monotonic())))
                continue
            if isinstance(cause, ConnectionRefusedError):
                raise _CliError("%s: connection refused (nothing is listening on it)" % path)
            if busy:
                raise _CliError("%s: cannot connect within %g s: the back-end's listen backlog "
                                "stayed full (is it serving other front-ends, or stopped?)"
                                % (path, timeout))
            if isinstance(cause, OSError):
                raise _CliError("%s: cannot connect: %s" % (path, _connect_cause(cause)))
            # The library's message already says "cannot connect to PATH: ...".
            raise _CliError(_one_line(exc))


def _percentile(ordered, fraction):
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _open_device(args, cls, device_type, **kwargs):
    """``cls.connect()`` on ``args.socket``, refusing another device type in one line.

    The type check uses GET_FEATURES and GET_PROTOCOL_FEATURES on the same
    connection the driver then takes over (virtiofsd serves only one).
    """
    packed = getattr(args, "packed", None)   # --packed/--split, where the command has them
    if packed is not None:
        if cls not in (BlockDevice, NetDevice):
            raise _UsageError("--packed and --split apply to blk and net devices only")
        kwargs["packed"] = packed
    client = _cli_connect(args.socket, args.timeout)
    try:
        features = client.get_features()
        protocol = None
        if features & VirtioFeature.PROTOCOL_FEATURES:
            protocol = client.get_protocol_features()
        _check_device_type(args.socket, device_type, features, protocol)
        if device_type == DeviceType.BLOCK and not (protocol or 0) & _P.CONFIG:
            # QEMU's vhost-user-blk refuses such a back-end too: capacity is in the config.
            raise _CliError("%s: wrong device type: the back-end does not offer CONFIG, so it "
                            "cannot be a vhost-user-blk device" % args.socket)
        if device_type == DeviceType.NET:
            # virtiofsd's bits are only a hint of virtio-fs, but a net back-end
            # offers net bits; without this the rings went up and the handshake
            # failed deep in SET_VRING_ENABLE, using up virtiofsd's one connection.
            guess, why, _ = _guess_device_type(features, protocol)
            if guess == DeviceType.FS:
                raise _CliError("%s: wrong device type: the back-end looks like a fs device (it "
                                "offers %s), not net" % (args.socket, why))
        return cls.connect(client, timeout=args.timeout, **kwargs)
    except FeatureNotNegotiated as exc:
        client.close()
        raise _CliError("%s: not a usable %s device: %s"
                        % (args.socket, device_type.name.lower(), _one_line(exc)))
    except BaseException:
        client.close()
        raise

#: IEEE 802 "local experimental" ethertype for the frames ``net`` makes.
_ETHERTYPE_TEST = 0x88B5
#: Source MAC of generated frames when the device reports none (DPDK does not):
#: a locally administered unicast address.
_TEST_MAC = b"\x02\0\0\0\0\x01"
_TEST_FRAME_HEADER = struct.Struct(">6s6sHI")   # destination, source, ethertype, sequence


def _test_frame(src_mac, seq, size):
    """A broadcast Ethernet frame of ``size`` bytes (at least 18) carrying ``seq``."""
    header = _TEST_FRAME_HEADER.pack(b"\xff" * 6, src_mac, _ETHERTYPE_TEST, seq & 0xFFFFFFFF)
    return (header + bytes(range(256)) * (size // 256 + 1))[:size]


def _check_frame_size(option, size):
    """Refuse, before connecting (status 2), a generated frame size no device takes: one
    carries a sequence number, and one descriptor of send() at most 64 KiB with its header."""
    low, high = _TEST_FRAME_HEADER.size, 0xFFFF - _NET_HDR.size
    if not low <= size <= high:
        raise _UsageError("%s %d: generated frames carry a sequence number and are %d..%d "
                          "bytes" % (option, size, low, high))
# -- fs bench -----------------------------------------------------------------

def _bench_fs(fs, args):
    """Keep ``--depth`` FUSE_READs (or WRITEs) in flight on one file; log each latency.

    The file (``--file``, in the share) is created with ``--file-size`` bytes
    when missing, and removed again afterwards.
    """
    size = 4096 if args.size is None else args.size
    rw = args.rw or "randread"
    if not 0 < size <= min(fs.max_read, fs.max_write):
        raise _CliError("%s %d must be in 1..%d (what one FUSE request carries)"
                        % (_typed_option(args, "--size", "--bs"), size,
                           min(fs.max_read, fs.max_write)))
    if args.depth > fs.queue_size:
        raise _CliError("%s %d: at most %d requests fit the %d-entry ring"
                        % (_typed_option(args, "--depth", "--iodepth"), args.depth,
                           fs.queue_size, fs.queue_size))
    created = not fs.exists(args.file)
    try:
        if created:
            _fs_fill(fs, args.file, args.file_size)
        with fs.open(args.file, "r+b", buffering=0) as f:
            file_size = fs.stat(args.file).st_size
            if file_size < size:
                raise _CliError("%s: %d bytes, smaller than --size %d" % (args.file, file_size,
                                                                         size))
            load = _BlockLoad(file_size, size, rw, 0)
            latencies, elapsed, cpu_self, cpu_backend = _bench_measured(
                args, lambda: [(_Latencies(args.depth),)],
                lambda _, deadline, lat, tick: _bench_fs_stream(
                    fs, f, load, args, deadline, lat[0], tick), size, "fs")
            report = _bench_report("fs", rw, size, args.depth, 1, elapsed,
                                   latencies[0][0].values(), cpu_self, cpu_backend)
            report["ramp_time"] = args.ramp_time
            return report
    finally:
        if created and fs.exists(args.file):   # not made when --file-size did not fit
            fs.remove(args.file)


def _fs_fill(fs, path, size):
    """Create ``path`` with ``size`` zero bytes, written in 1 MiB steps (no buffer of ``size``)."""
    st = fs.statvfs()
    if size > st.f_bavail * st.f_frsize:
        raise _CliError("--file-size %d: more than the %d bytes free in the share"
                        % (size, st.f_bavail * st.f_frsize))
    zeros = memoryview(bytes(min(size, 1 << 20)))
    with fs.open(path, "xb", buffering=0) as f:
        left = size
        while left:
            left -= f.write(zeros[:left])


def _bench_fs_stream(fs, f, load, args, deadline, latencies, tick=None):
    """One ``_bench_loop`` of FUSE_READs (or WRITEs) of ``load.size`` bytes on open file ``f``."""
    size = load.size
    op = _FuseOp.WRITE if load.write else _FuseOp.READ
    buffers = [bytearray(size) for _ in range(args.depth)]
    requests = [None] * args.depth   # per slot: its request in flight
    node, fh = f._node, f._fh

    def post(slots, now):
        for slot, offset in zip(slots, load.offsets(len(slots))):
            io_in = _FUSE_IO_IN.pack(fh, offset, size, 0, 0, 0, 0)
            if load.write:
                requests[slot] = fs._submit(op, node.nodeid, [io_in, load.data], bytearray(8))
            else:
                requests[slot] = fs._submit(op, node.nodeid, [io_in], buffers[slot])

    def reap():
        pending = [r for r in requests if r is not None]
        completions = pending[0].queue
        completions.queue.notify()
        completions.wait(lambda: any(r.done for r in pending), time.monotonic() + fs.timeout,
                         op.name)
        return [slot for slot, r in enumerate(requests) if r is not None and r.done]

    def complete(slots, now):
        for slot in slots:
            request, requests[slot] = requests[slot], None
            length = fs._result(request, filename=args.file)
            if load.write and _FUSE_U32_PAIR.unpack(request.reply)[0] != size or \
                    not load.write and length != size:
                raise _CliError("%s: a %s of %d bytes moved %d" % (args.file, op.name, size,
                                                                   length))

    _bench_loop(args.depth, deadline, post, reap, latencies, tick, complete)
# -- bench --------------------------------------------------------------------

def _proc_cpu_seconds(pid, required=True):
    """User + system CPU seconds so far of process ``pid`` and every process under it (/proc).

    The whole tree, because a daemon may work in a child (virtiofsd's sandbox
    forks; the socket's peer is the parent, which only waits). Children that
    ended and were waited for count through cutime and cstime. When ``pid``
    cannot be read: a _CliError if ``required``, else None.
    """
    stats = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        names = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            # ppid is field 4 of proc(5), utime..cstime 14..17; fields[0] is field 3.
            stats[int(name)] = (int(fields[1]), sum(int(v) for v in fields[11:15]))
        except (OSError, IndexError, ValueError):
            continue    # gone meanwhile
    if pid not in stats:
        if required:
            raise _CliError("--backend-pid %d: no such process (or /proc is not readable)"
                            % pid)
        return None
    children = collections.defaultdict(list)
    for child, (parent, _) in stats.items():
        children[parent].append(child)
    ticks, todo = 0, [pid]
    while todo:
        process = todo.pop()
        ticks += stats[process][1]
        todo.extend(children.get(process, ()))
    return ticks / float(os.sysconf("SC_CLK_TCK"))


class _PeerCpu:
    """The back-end's CPU seconds over a bench run: ``--backend-pid``, or by default the
    socket's peer (SO_PEERCRED, see ``_bench_peer``); ``used()`` is None when unknown."""

    def __init__(self, args):
        self.pid = args.backend_pid
        self.required = not getattr(args, "backend_pid_found", False)
        self.start = self._read()

    def _read(self):
        return _proc_cpu_seconds(self.pid, self.required) if self.pid else None

    def used(self):
        end = self._read() if self.start is not None else None
        return None if end is None else end - self.start


def _bench_peer(args, dev):
    """Without --backend-pid, the back-end's pid from the socket (SO_PEERCRED)."""
    if args.backend_pid is None:
        client = dev.frontend.client if dev.frontend is not None else None
        args.backend_pid = client.peer_pid() if client is not None else None
        args.backend_pid_found = True


def _self_cpu_seconds():
    """This process's user + system CPU seconds, every thread (getrusage: µs resolution)."""
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Progress:
    """The live ``bench`` line on stderr, redrawn twice a second; only on a terminal."""

    def __init__(self, stream, total_seconds, kind):
        self.stream = stream
        self.enabled = hasattr(stream, "isatty") and stream.isatty()
        self.total = total_seconds
        self.kind = kind
        self.next_draw = 0.0

    def update(self, elapsed, requests, request_size):
        if not self.enabled or elapsed < self.next_draw:
            return
        self.next_draw = elapsed + 0.5
        rate = requests / elapsed if elapsed else 0.0
        if self.kind == "net":
            rates = "%10.0f packets/s  %8.1f Mbit/s" % (rate, rate * request_size * 8e-6)
        else:
            rates = "%10.0f IOPS  %8.1f MiB/s" % (rate, rate * request_size / 2**20)
        self.stream.write("\r%5.1f/%.1f s  %s" % (elapsed, self.total, rates))
        self.stream.flush()

    def done(self):
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _bench_report(kind, rw, size, depth, queues, elapsed, latencies, cpu_self, cpu_backend):
    """The dict ``bench --json`` prints; latencies in seconds, any order.

    blk reports IOPS and MiB/s of data; net (``rw`` None) packets/s and
    Mbit/s of frames, each way; ``requests`` counts round trips there.
    """
    latencies.sort()
    count = len(latencies)
    rate = count / elapsed if elapsed else 0.0
    usec = _usec
    report = {"type": kind}
    if rw is not None:
        report["rw"] = rw
    report.update([("size", size), ("depth", depth), ("queues", queues),
                   ("seconds", round(elapsed, 4)), ("requests", count)])
    if kind == "net":
        report["packets_per_s"] = round(rate, 1)
        report["mbit_per_s"] = round(rate * size * 8e-6, 2)
    else:
        report["iops"] = round(rate, 1)
        report["mib_per_s"] = round(rate * size / 2**20, 2)
    report.update([
        ("latency_us", {"min": usec(latencies[0] if latencies else None),
                        "p50": usec(_percentile(latencies, 0.50)),
                        "p99": usec(_percentile(latencies, 0.99)),
                        "p999": usec(_percentile(latencies, 0.999)),
                        "max": usec(latencies[-1] if latencies else None)}),
        ("frontend_cpu_us_per_request", usec(cpu_self / count) if count else None),
        ("backend_cpu_us_per_request", usec(cpu_backend / count)
         if count and cpu_backend is not None else None),
    ])
    return report


def _format_bench(report):
    lat = report["latency_us"]
    backend = report["backend_cpu_us_per_request"]
    if backend is None:
        backend = "n/a (the back-end's CPU time could not be read; give --backend-pid)"
    if report["type"] == "net":
        pairs = report["queues"]
        lines = [
            "net loopback, %d-byte frames, depth %d%s, %d queue pair%s, %s rings%s, %.2f s"
            % (report["size"], report["depth"], " per pair" if pairs > 1 else "", pairs,
               "s" if pairs > 1 else "", "packed" if report.get("packed") else "split",
               ", mergeable buffers" if report.get("mrg_rxbuf") else "", report["seconds"]),
            "  %-22s %.0f  (%d round trips)" % ("packets/s", report["packets_per_s"],
                                                report["requests"]),
            "  %-22s %.2f  (each way)" % ("Mbit/s", report["mbit_per_s"]),
            "  %-22s %d frame(s) compared byte for byte: all as sent%s"
            % ("verify", report["verified_frames"], "" if report.get("verify") else
               " (the others: their lengths)"),
        ]
        for one in report.get("pairs", ()):
            lines.append("  %-22s %.0f packets/s, round trip p50 %s µs"
                         % ("pair %d" % one["pair"], one["packets_per_s"],
                            one["latency_us"]["p50"]))
        unit = "µs/packet"
    else:
        lines = [
            "%s %s, %d bytes, depth %d, %d queue(s), %.2f s"
            % (report["type"], report["rw"], report["size"], report["depth"],
               report["queues"], report["seconds"]),
            "  %-22s %.0f  (%d requests)" % ("IOPS", report["iops"], report["requests"]),
            "  %-22s %.2f" % ("MiB/s", report["mib_per_s"]),
        ]
        unit = "µs/req"
    lines += [
        "  %-22s p50 %s  p99 %s  p99.9 %s  (min %s, max %s)"
        % ("round trip (µs)" if report["type"] == "net" else "latency (µs)",
           lat["p50"], lat["p99"], lat["p999"], lat["min"], lat["max"]),
        "  %-22s %s" % ("frontend CPU " + unit, report["frontend_cpu_us_per_request"]),
        "  %-22s %s" % ("backend CPU " + unit, backend),
    ]
    fio = report.get("fio")
    if fio is not None:
        job = fio["jobs"][0]
        if 0 < report["rwmixread"] < 100:
            lines += ["  %-22s IOPS %.0f, %.2f MiB/s, latency p50 %s µs"
                      % (name, job[name]["iops"], job[name]["bw_bytes"] / 2.0**20,
                         _usec(job[name]["clat_ns"].get("percentile", {}).get("50.000000",
                                                                                0) / 1e9))
                      for name in ("read", "write")]
        entries = ["%sth=[%s]" % (name.rjust(5), str(value).rjust(8))
                   for name, value in report["clat_percentiles_us"].items()]
        lines.append("  clat percentiles (µs):")
        lines += ["   | " + ", ".join(entries[i:i + 4]) + ("," if i + 4 < len(entries) else "")
                  for i in range(0, len(entries), 4)]
        if report.get("histogram"):
            lines.append("  latency histogram:")
            lines += _format_histogram(report["histogram"])
        if report["verified_blocks"] is not None:
            lines.append("  %-22s %d block(s) read back and checked: all as written"
                         % ("verify", report["verified_blocks"]))
    placement = report.get("placement")
    if placement is not None:
        lines.append("  %-22s %s, spin %g µs%s, %s" % (
            "placement", "one CPU shared with the back-end" if placement["shared_cpu"]
            else "not sharing one CPU", placement["spin_us"],
            " adapting up to %g µs" % placement["spin_max_us"] if placement["spin_max_us"]
            else "",
            "EVENT_IDX, calls only before sleeping" if placement["defer_calls"]
            else "EVENT_IDX" if placement["event_idx"] else "a call per completion"))
    return lines


#: fio's --rw modes: random offsets?, and the percent of reads (None: --rwmixread, 50).
_BENCH_RW = {"read": (False, 100), "write": (False, 0), "randread": (True, 100),
             "randwrite": (True, 0), "rw": (False, None), "readwrite": (False, None),
             "randrw": (True, None)}


class _BlockLoad:
    """Offsets and data for one block bench stream (one per queue), drawn before the clock runs."""

    #: Random offsets are drawn once, this many, and used in turn.
    table_size = 1 << 16

    def __init__(self, capacity, size, rw, seed, start=0, read_percent=None):
        import random
        rng = self.rng = random.Random(seed)
        # The region is start..start+capacity (fio's offset= and size=).
        slots = max(1, capacity // size)
        self.size = size
        self.start = start
        random_offsets, default_percent = _BENCH_RW[rw]
        self.read_percent = default_percent if read_percent is None or default_percent in (
            0, 100) else read_percent
        if self.read_percent is None:
            self.read_percent = 50
        self.write = self.read_percent == 0          # writes only
        self.mixed = 0 < self.read_percent < 100     # each request reads or writes
        self.data = rng.getrandbits(8 * size).to_bytes(size, "little")
        if random_offsets:
            self.table = [start + rng.randrange(slots) * size for _ in range(self.table_size)]
        else:
            self.table = [start + (i % slots) * size for i in range(min(slots, self.table_size))]
            if slots > self.table_size:   # sequential over more than the table: keep counting
                self.table = None
        self.slots = slots
        self.next = 0

    def offsets(self, count):
        """The next ``count`` offsets, as one list."""
        start = self.next
        self.next = start + count
        table = self.table
        if table is None:
            slots, size, base = self.slots, self.size, self.start
            return [base + (i % slots) * size for i in range(start, start + count)]
        start %= len(table)
        chunk = table[start:start + count]
        while len(chunk) < count:
            chunk += table[:count - len(chunk)]
        return chunk


#: The smallest logical block of a virtio-blk device (spec 5.2.4: blk_size >= 512).
_BENCH_MIN_BLOCK = 512


def _check_bench_usage(args):
    """Refuse, before connecting (status 2), a --size or --depth no device takes.

    What depends on the device (its block size, ring, MTU) is checked once
    connected (status 1); both name the spelling typed (--bs, --iodepth).
    """
    size_option = _typed_option(args, "--size", "--bs")
    depth_option = _typed_option(args, "--depth", "--iodepth")
    size = args.size
    if args.type == "net":
        depth_max = MAX_QUEUE_SIZE
        if size is not None:
            _check_frame_size(size_option, size)
    else:
        depth_max = MAX_QUEUE_SIZE // 3 if args.type == "blk" else MAX_QUEUE_SIZE
        if args.type == "blk" and size is not None and (
                size <= 0 or size % _BENCH_MIN_BLOCK):
            raise _UsageError("%s %d: must be a positive multiple of %d bytes (the smallest "
                              "block size)" % (size_option, size, _BENCH_MIN_BLOCK))
        if args.type == "fs" and size is not None and size <= 0:
            raise _UsageError("%s %d: must be at least 1 byte" % (size_option, size))
    if args.mrg_rxbuf and args.type != "net":
        raise _UsageError("--mrg-rxbuf applies to --type net only")
    if args.depth > depth_max:
        raise _UsageError("%s %d: at most %d requests fit the largest ring (%d entries%s)"
                          % (depth_option, args.depth, depth_max, MAX_QUEUE_SIZE,
                             ", 3 per request" if args.type == "blk" else ""))


def _bench_blk_only(args, rw, verify=True):
    """The options given (not at their defaults) that only blk takes, ``rw`` first when set;
    ``--verify`` too unless ``verify`` is false (net takes it)."""
    return [name for name, value in (
        rw, ("--rwmixread", args.rwmixread), ("--offset", args.offset or None),
        ("--span", args.span),
        ("--verify", (args.verify or None) if verify else None), ("--spin", args.spin),
        ("--event-idx", args.event_idx),
        ("--loop", None if args.loop == "device" else args.loop)) if value is not None]


def _cmd_bench(args, out):
    _check_bench_usage(args)
    if args.packed is None and args.type != "fs":
        args.packed = False   # split rings unless --packed: see _BENCH_RING
    if args.type == "net":
        given = _bench_blk_only(args, ("--rw", args.rw), verify=False)
        if given:
            raise _UsageError("%s applies to --type blk%s only"
                            % (given[0], " and fs" if given[0] == "--rw" else ""))
        # No MRG_RXBUF unless asked: a frame up to the MTU fits one receive buffer,
        # and DPDK's vhost PMD took 8 µs to fill 32 mergeable ones, 3 µs otherwise.
        with _open_device(args, NetDevice, DeviceType.NET, queue_pairs=args.queues or 1,
                          mrg_rxbuf=args.mrg_rxbuf) as dev:
            _bench_peer(args, dev)
            report = _bench_net(dev, args)
    elif args.type == "fs":
        # fs reads or writes; the mixed modes are blk's only.
        given = _bench_blk_only(args, ("--rw %s" % args.rw, args.rw if args.rw in (
            "rw", "readwrite", "randrw") else None))
        if given:
            raise _UsageError("%s applies to --type blk%s only"
                              % (given[0], " and net" if given[0] == "--verify" else ""))
        if args.queues not in (None, 1):
            raise _UsageError("--queues %d: bench --type fs uses one request queue" % args.queues)
        with _open_device(args, FsDevice, DeviceType.FS) as dev:
            _bench_peer(args, dev)
            report = _bench_fs(dev, args)
    else:
        kwargs = {"num_queues": args.queues} if args.queues else {}
        kwargs["spin"] = args.spin
        kwargs["event_idx"] = None if args.event_idx is None else args.event_idx == "on"
        # Rings and guest memory big enough for --depth requests of --size bytes per
        # queue (3 descriptors each); both capped later by what the device takes.
        ring = 1 << (3 * args.depth - 1).bit_length()
        kwargs["queue_size"] = min(MAX_QUEUE_SIZE, max(128, ring))
        if args.size is not None and args.size > 0:
            kwargs["memory_size"] = max(64 << 20, ((args.queues or 1) * args.depth * args.size
                                                   + (16 << 20) + 0xFFFFF) & ~0xFFFFF)
        with _open_device(args, BlockDevice, DeviceType.BLOCK, **kwargs) as dev:
            _bench_peer(args, dev)
            report = _bench_block(dev, args)
    if not report["requests"]:
        raise _CliError("%s: bench: no request completed within %g s"
                        % (args.socket, args.seconds))
    if args.json:
        import json
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        out.write("\n".join(_format_bench(report)) + "\n")
    return 0


def _bench_block(dev, args):
    size = 4096 if args.size is None else args.size
    rw = args.rw or "randread"
    largest = min(dev.capacity, dev.max_transfer)
    if size <= 0 or size % dev.block_size or size > largest:
        raise _CliError("%s %d must be a positive multiple of the block size %d, at most "
                        "%d (the capacity or the largest request the device takes)"
                        % (_typed_option(args, "--size", "--bs"), size, dev.block_size,
                           largest))
    ring = dev._queues[0].size
    if args.depth > ring // 3:
        # More could never be in flight: a request takes 3 descriptors.
        raise _CliError("%s %d: at most %d requests fit the %d-entry ring"
                        % (_typed_option(args, "--depth", "--iodepth"), args.depth,
                           ring // 3, ring))
    region = _bench_region(dev, args, size)
    queues = args.queues or 1
    loads = [_BlockLoad(region[1], size, rw, seed, region[0], args.rwmixread)
             for seed in range(queues)]
    if not loads[0].read_percent == 100 and dev.read_only:
        raise _CliError("%s: the device is read-only; use --rw read or randread" % args.socket)
    if args.verify or loads[0].mixed:
        if args.verify and queues > 1:
            # Each stream checks its own blocks: give each its own part of the region.
            part = region[1] // queues // size * size
            if part < size:
                raise _CliError("--verify: the region of %d bytes cannot give each of %d "
                                "queues a block of %d" % (region[1], queues, size))
            loads = [_BlockLoad(part, size, rw, q, region[0] + q * part, args.rwmixread)
                     for q in range(queues)]
        checked = [_BlockCheck(load, args.verify) for load in loads]
    else:
        checked = None
    # --loop queue times the plain modes only; mixed and --verify runs check every request.
    loop = _bench_queue_stream if args.loop == "queue" and not checked else _bench_block_stream

    def stream(queue, deadline, latencies, tick):
        check = (checked[queue],) if checked else ()
        loop(dev, queue, loads[queue], args.depth, deadline, latencies, tick, *check)

    def new_latencies():   # each stream's reads and writes
        return [(_Latencies(args.depth), _Latencies(args.depth)) for _ in range(queues)]

    def after_ramp():
        for check in checked or ():
            check.verified = 0

    latencies, elapsed, cpu_self, cpu_backend = _bench_measured(args, new_latencies, stream,
                                                                size, "blk", after_ramp)
    verified = None
    if checked is not None and args.verify:
        for q in range(queues):
            _bench_read_back(dev, q, checked[q], args.depth)
        verified = sum(check.verified for check in checked)
    reads = [t for per_queue in latencies for t in per_queue[0].values()]
    writes = [t for per_queue in latencies for t in per_queue[1].values()]
    ordered = reads + writes   # sorted by _bench_report
    report = _bench_report("blk", rw, size, args.depth, queues, elapsed, ordered,
                           cpu_self, cpu_backend)
    if not writes:
        reads = ordered   # the same latencies, sorted: _fio_json's sort is then quick
    elif not reads:
        writes = ordered
    placement = dev.placement
    report["placement"] = {"backend_pid": placement.backend_pid,
                           "shared_cpu": placement.shared_cpu,
                           "spin_us": round(placement.spin * 1e6, 2),
                           "spin_max_us": round(placement.spin_max * 1e6, 2),
                           "event_idx": placement.event_idx,
                           "defer_calls": placement.defer_calls}
    report["region"] = {"offset": region[0], "span": region[1]}
    report["rwmixread"] = loads[0].read_percent
    report["ramp_time"] = args.ramp_time
    report["verified_blocks"] = verified
    report["clat_percentiles_us"] = collections.OrderedDict(
        (_fio_percentile_name(p), _usec(_percentile(ordered, p / 100.0)))
        for p in _CLAT_PERCENTILES)
    report["fio"] = _fio_json(args, rw, size, queues, elapsed, reads, writes,
                              loads[0].read_percent)
    if args.histogram:
        report["histogram"] = _latency_histogram(ordered)
    return report


def _bench_region(dev, args, size):
    """(offset, span) of the region --offset/--span name, checked against the device."""
    offset = args.offset
    if offset % dev.block_size or offset >= dev.capacity:
        raise _CliError("--offset %d must be a multiple of the block size %d below the "
                        "capacity %d" % (offset, dev.block_size, dev.capacity))
    span = dev.capacity - offset if args.span is None else args.span
    if span < size or offset + span > dev.capacity:
        raise _CliError("--span %d: the region must hold one request of %d bytes and end by "
                        "the capacity %d (it ends at %d)" % (span, size, dev.capacity,
                                                              offset + span))
    return offset, span


def _bench_measured(args, new_latencies, stream, size, kind, after_ramp=None):
    """``_bench_phase`` for ``--seconds``, with the CPU time both sides used.

    First, fio's ramp_time: the same load for ``--ramp_time`` seconds, its
    figures thrown away (then ``after_ramp()``); a JIT (PyPy) compiles the
    hot path in about the first half second of a run. Returns (latencies:
    a fresh ``new_latencies()``, seconds, our CPU, the back-end's).
    """
    if args.ramp_time:
        _bench_phase(args, new_latencies(), stream, args.ramp_time, size, kind)
        if after_ramp is not None:
            after_ramp()
    latencies = new_latencies()
    backend = _PeerCpu(args)
    cpu_start = _self_cpu_seconds()
    elapsed = _bench_phase(args, latencies, stream, args.seconds, size, kind)
    return latencies, elapsed, _self_cpu_seconds() - cpu_start, backend.used()


def _bench_phase(args, latencies, stream, seconds, size, kind):
    """Run one ``stream`` per entry of ``latencies`` (a thread each but the first) for ``seconds``.

    ``stream(index, deadline, latencies[index], tick)``: an entry is a tuple
    of that stream's _Latencies (blk: reads, writes). Returns the seconds
    it took.
    """
    errors = []
    progress = _Progress(sys.stderr, seconds, kind)
    start = time.perf_counter()
    deadline = start + seconds

    def run(index):
        try:
            stream(index, deadline, latencies[index], None)
        except BaseException as exc:  # re-raised by the main thread
            errors.append(exc)

    def tick():
        progress.update(time.perf_counter() - start,
                        sum(len(one) for per_stream in latencies for one in per_stream), size)

    threads = [threading.Thread(target=run, args=(i,), name="bench-%s-%d" % (
        "pair" if kind == "net" else "queue", i)) for i in range(1, len(latencies))]
    for thread in threads:
        thread.start()
    try:
        stream(0, deadline, latencies[0], tick if progress.enabled else None)
    finally:
        for thread in threads:
            thread.join(deadline - time.perf_counter() + 2 * args.timeout)
        progress.done()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


class _Latencies:
    """One bench stream's completion latencies, in seconds.

    ``append`` logs one. A whole batch of ``batch_size`` requests that
    completed together is logged once, its latency appended to ``batches``
    (by the stream itself: one list append per batch), and expanded only by
    ``values``, after the timed part. ``len`` counts requests.
    """

    def __init__(self, batch_size):
        self.single, self.batches, self.batch_size = [], [], batch_size
        self.append = self.single.append

    def __len__(self):
        return len(self.single) + self.batch_size * len(self.batches)

    def values(self):
        """Every request's latency, as one list (in no particular order)."""
        out = list(self.single)
        for latency in self.batches:
            out.extend([latency] * self.batch_size)
        return out


def _bench_loop(depth, deadline, post, reap, latencies, tick=None, complete=None):
    """Keep ``depth`` requests in flight until ``deadline``: the measured loop of every bench.

    A stream gives its hooks, each called once per batch (never per request,
    which would cost the hot path a call each): ``post(slots, now)`` starts a
    request in each of ``slots`` (indices below ``depth``; all of them at
    first), ``reap()`` returns the slots of requests that completed (at least
    one), and ``complete(slots, now)``, when given, checks them. A latency runs
    from the ``now`` of the post that started a request to the clock read just
    after the reap that returned it; it goes to ``latencies`` (a _Latencies),
    or, when that is None, is ``complete``'s to log. ``tick`` (the progress
    line) runs at most every 0.1 s.
    """
    clock = time.perf_counter
    if latencies is not None:
        record = latencies.append
        whole_batch = latencies.batches.append   # the latency of ``depth`` requests
    now = clock()
    started = [now] * depth
    together = now   # when every request in flight was posted at one time, that time
    in_flight = 0
    if now < deadline:
        post(list(range(depth)), now)
        in_flight = depth
    next_tick = now + 0.1
    while in_flight:
        done = reap()
        now = clock()
        if complete is not None:
            complete(done, now)
        if latencies is None:
            pass
        elif together is not None and len(done) == depth:
            # The usual batch: every request, all posted at one time. The
            # same latencies as the loop below, logged once for all.
            whole_batch(now - together)
            together = now
        else:
            if together is not None:
                started = [together] * depth
            for i in done:
                record(now - started[i])
                started[i] = now
            together = now if len(done) == depth else None
        if now < deadline:
            post(done, now)
        else:
            in_flight -= len(done)
        if tick is not None and now >= next_tick:
            next_tick = now + 0.1
            tick()


def _bench_free(dev, buffers):
    """Give back a stream's ``alloc``ed buffers."""
    for buffer in buffers:
        try:
            dev.free(buffer)
        except ValueError:   # still in flight after an error: close() releases it
            pass


def _bench_block_stream(dev, queue, load, depth, deadline, latencies, tick=None, check=None):
    """One ``_bench_loop`` on ``queue`` over the library's fast path, as a user of it would.

    ``alloc``ed buffers, and the requests that replace the ones a ``reap``
    returned posted as one batch (one kick) with ``post_reads``/``post_writes``,
    the buffer's index as user data; ``latencies`` holds the stream's reads
    and writes. With a ``check`` (a _BlockCheck: mixed rw, randrw and
    ``--verify`` runs) each request's direction is drawn against --rwmixread,
    and with --verify a write is stamped with its header and a read of a block
    this stream wrote (every block, in the read modes) is checked. That
    per-request work is why the plain modes post without it.
    """
    buffers = []
    try:
        for _ in range(depth):
            buffers.append(dev.alloc(load.size))
            if load.write or check is not None:
                buffers[-1][:] = load.data
        if check is None:
            post, complete = _bench_block_plain(dev, queue, load, depth, buffers), None
            latencies = latencies[1 if load.write else 0]
        else:
            post, complete = _bench_block_checked(dev, queue, load, check, depth, buffers,
                                                  latencies)
            latencies = None   # ``complete`` logs each request's by its direction
        # dev.reap's arguments by position: a little cheaper on CPython.
        _bench_loop(depth, deadline, post, functools.partial(dev.reap, queue), latencies, tick,
                    complete)
    finally:
        _bench_free(dev, buffers)


def _bench_block_plain(dev, queue, load, depth, buffers):
    """The post hook of a read-only or write-only block stream."""
    post_requests = dev.post_writes if load.write else dev.post_reads
    offsets = load.offsets
    indices = list(range(depth))

    def post(done, now):
        post_requests(offsets(len(done)),
                      buffers if done == indices else list(map(buffers.__getitem__, done)),
                      done, queue)
    return post


def _bench_block_checked(dev, queue, load, check, depth, buffers, latencies):
    """The post and complete hooks of a mixed or ``--verify`` block stream."""
    draw = load.rng.random
    reads_at = load.read_percent / 100.0
    verify = check.verify
    is_write = [False] * depth
    offset_of = [0] * depth
    started = [0.0] * depth
    read_latencies, write_latencies = latencies

    def post(indices, now):
        reads, writes = ([], [], []), ([], [], [])
        for i, offset in zip(indices, load.offsets(len(indices))):
            write = draw() >= reads_at
            is_write[i] = write
            offset_of[i] = offset
            started[i] = now
            if verify:
                if write:
                    check.before_write(buffers[i], offset)
                else:
                    check.before_read(i, offset)
            batch = writes if write else reads
            batch[0].append(offset)
            batch[1].append(buffers[i])
            batch[2].append(i)
        # Not kicked here: the next reap kicks once for both.
        if reads[2]:
            dev.post_reads(reads[0], reads[1], reads[2], queue=queue, notify=False)
        if writes[2]:
            dev.post_writes(writes[0], writes[1], writes[2], queue=queue, notify=False)

    def complete(done, now):
        for i in done:
            if is_write[i]:
                write_latencies.append(now - started[i])
                if verify:
                    check.after_write(offset_of[i])
            else:
                read_latencies.append(now - started[i])
                if verify:
                    check.after_read(i, buffers[i], offset_of[i])
    return post, complete


def _bench_queue_stream(dev, queue, load, depth, deadline, latencies, tick=None):
    """``bench --loop queue``: the same load and ``_bench_loop``, its hooks plain ``Queue`` calls.

    The yardstick for the device's fast path: one slot per request built
    once with ``add_slot``, the header's sector written in place, the batch
    posted with ``post_slots`` and one ``notify``, completions taken with
    ``wait_used``, each status byte checked. Nothing else (no buffer or
    range checks, no user data).
    """
    latencies = latencies[1 if load.write else 0]
    q = dev._queues[queue]
    mem = dev._mem
    size = load.size
    op = _BLK_T_OUT if load.write else _BLK_T_IN
    block = mem.allocate(depth * (size + 17))
    data, headers, statuses = block, block + depth * size, block + depth * (size + 16)
    header = mem.view(headers, 16 * depth).cast("Q")
    status = mem.view(statuses, depth)
    slots = []

    def post(ready, now):
        for i, offset in zip(ready, load.offsets(len(ready))):
            header[2 * i + 1] = offset >> 9
        q.post_slots([slots[i] for i in ready], ready)
        q.notify()

    def reap():
        ready = []
        for i, _ in q.wait_used(dev.timeout):
            if status[i]:
                raise BackendError("%s: virtio-blk status %d" % (_BLK_OP_NAMES[op], status[i]),
                                   value=status[i])
            ready.append(i)
        if not ready:
            raise VhostUserTimeout("bench: no completion within %g s" % dev.timeout)
        return ready

    try:
        for i in range(depth):
            header[2 * i] = op
            buffer = (data + i * size, size)
            if load.write:
                mem.write(buffer[0], load.data)
                slots.append(q.add_slot([(headers + 16 * i, 16), buffer], [(statuses + i, 1)]))
            else:
                slots.append(q.add_slot([(headers + 16 * i, 16)], [buffer, (statuses + i, 1)]))
        _bench_loop(depth, deadline, post, reap, latencies, tick)
    finally:
        header.release()
        status.release()
        for slot in slots:
            try:
                q.remove_slot(slot)
            except (ValueError, ProtocolError):   # in flight after an error
                pass


#: --verify's header at the start of every block bench writes: a magic, the
#: block's offset, a sequence number (per stream) and the CRC32 of the rest
#: of the block, so a read tells a stale, misplaced or changed block apart.
_VERIFY_HEADER = struct.Struct("<8sQQI")
_VERIFY_MAGIC = b"vhubench"


class _BlockCheck:
    """What a mixed or ``--verify`` bench stream tracks: headers written, blocks to check."""

    def __init__(self, load, verify):
        import zlib
        self.crc32 = zlib.crc32
        self.verify = verify and load.size > _VERIFY_HEADER.size
        self.check_all = load.read_percent == 100   # read modes: every block has a header
        self.payload = load.data[_VERIFY_HEADER.size:]
        self.crc = zlib.crc32(self.payload)
        self.sequence = 0
        self.written = set()   # offsets this stream wrote and saw complete
        self.writing = {}      # offset -> writes in flight
        self.reading = {}      # offset -> slots whose read of it will be checked
        self.checkable = {}    # slot -> whether its read in flight will be checked
        self.verified = 0

    def before_write(self, buffer, offset):
        self.sequence += 1
        buffer[_VERIFY_HEADER.size:] = self.payload   # a read may have used this buffer
        _VERIFY_HEADER.pack_into(buffer, 0, _VERIFY_MAGIC, offset, self.sequence, self.crc)
        self.writing[offset] = self.writing.get(offset, 0) + 1
        # A read of the block already in flight may now see it half written.
        for slot in self.reading.pop(offset, ()):
            self.checkable[slot] = False

    def after_write(self, offset):
        left = self.writing.pop(offset) - 1
        if left:
            self.writing[offset] = left
        self.written.add(offset)

    def before_read(self, slot, offset):
        # Checked: every block in the read modes; in mixed ones a block this
        # stream wrote, with no write of it in flight from now to the reap.
        checkable = self.check_all or offset in self.written and offset not in self.writing
        self.checkable[slot] = checkable
        if checkable:
            self.reading.setdefault(offset, []).append(slot)

    def after_read(self, slot, buffer, offset):
        if self.checkable.pop(slot):
            slots = self.reading[offset]
            slots.remove(slot)
            if not slots:
                del self.reading[offset]
            self.check(buffer, offset)

    def check(self, buffer, offset):
        """Raise _CliError naming ``offset`` when the block read is not what bench wrote."""
        magic, at, sequence, crc = _VERIFY_HEADER.unpack_from(buffer)
        if magic != _VERIFY_MAGIC:
            problem = "no bench --verify header (was it written by bench --verify?)"
        elif at != offset:
            problem = "it holds the block written for offset %d" % at
        elif self.crc32(buffer[_VERIFY_HEADER.size:]) != crc:
            problem = ("its bytes changed after bench wrote it (CRC32 mismatch, sequence "
                       "number %d)" % sequence)
        else:
            self.verified += 1
            return
        raise _CliError("bench --verify: block of %d bytes at offset %d: %s"
                        % (len(buffer), offset, problem))


def _bench_read_back(dev, queue, check, depth):
    """--verify after writing: read every block this stream wrote and check it (fio does)."""
    offsets = sorted(check.written)
    if not offsets:
        return
    size = len(check.payload) + _VERIFY_HEADER.size
    buffers = [dev.alloc(size) for _ in range(min(depth, len(offsets)))]
    try:
        for start in range(0, len(offsets), len(buffers)):
            batch = offsets[start:start + len(buffers)]
            dev.post_reads(batch, buffers[:len(batch)], list(range(len(batch))), queue=queue)
            done = []
            while len(done) < len(batch):
                done += dev.reap(queue=queue, count=len(batch) - len(done))
            for i in done:
                check.check(buffers[i], batch[i])
    finally:
        _bench_free(dev, buffers)


def _usec(seconds):
    return None if seconds is None else round(seconds * 1e6, 2)


#: The completion-latency percentiles bench prints, fio's defaults among them.
_CLAT_PERCENTILES = (1, 5, 10, 50, 90, 99, 99.9, 99.99)


def _fio_percentile_name(percent):
    return "%.2f" % percent


def _fio_json(args, rw, size, queues, elapsed, reads, writes, read_percent):
    """The part of fio's --output-format=json that tools parsing fio read.

    One job, as fio prints with group_reporting. Latencies run from the post
    to the reap (fio's clat and lat are both that: submission is not timed
    apart, so slat is 0).
    """
    def direction(seconds):
        ns = [t * 1e9 for t in seconds]
        ns.sort()
        count = len(ns)
        mean = sum(ns) / count if count else 0.0
        stddev = (sum((x - mean) ** 2 for x in ns) / count) ** 0.5 if count else 0.0
        stats = collections.OrderedDict([("min", int(round(ns[0])) if ns else 0),
                                         ("max", int(round(ns[-1])) if ns else 0),
                                         ("mean", mean), ("stddev", stddev), ("N", count)])
        clat = collections.OrderedDict(stats)
        if ns:
            clat["percentile"] = collections.OrderedDict(
                ("%f" % p, int(round(_percentile(ns, p / 100.0)))) for p in _CLAT_PERCENTILES)
        total = count * size
        return collections.OrderedDict([
            ("io_bytes", total), ("io_kbytes", total // 1024),
            ("bw_bytes", int(total / elapsed) if elapsed else 0),
            ("bw", int(total / 1024.0 / elapsed) if elapsed else 0),
            ("iops", count / elapsed if elapsed else 0.0),
            ("runtime", int(round(elapsed * 1000))), ("total_ios", count),
            ("short_ios", 0), ("drop_ios", 0),
            ("slat_ns", collections.OrderedDict([("min", 0), ("max", 0), ("mean", 0.0),
                                                 ("stddev", 0.0), ("N", 0)])),
            ("clat_ns", clat), ("lat_ns", stats)])

    options = collections.OrderedDict([
        ("rw", rw), ("bs", str(size)), ("iodepth", str(args.depth)), ("numjobs", str(queues)),
        ("offset", str(args.offset)), ("runtime", "%g" % args.seconds),
        ("ramp_time", "%g" % args.ramp_time)])
    if args.span is not None:
        options["size"] = str(args.span)
    if 0 < read_percent < 100:
        options["rwmixread"] = str(read_percent)
    if args.verify:
        options["verify"] = "crc32"
    job = collections.OrderedDict([
        ("jobname", "bench"), ("groupid", 0), ("error", 0), ("job options", options),
        ("read", direction(reads)), ("write", direction(writes)), ("trim", direction([])),
        ("job_runtime", int(round(elapsed * 1000)))])
    return collections.OrderedDict([("fio version", "%s-%s" % (_PROG, __version__)),
                                    ("timestamp", int(time.time())), ("jobs", [job])])


def _latency_histogram(latencies):
    """Completion latencies counted in power-of-two µs buckets: [{from_us, to_us, count}]."""
    counts = collections.Counter()
    for seconds in latencies:
        usec = seconds * 1e6
        counts[int(usec).bit_length()] += 1   # bucket k holds [2**(k-1), 2**k) µs; 0: < 1
    if not counts:
        return []
    return [{"from_us": 0 if k == 0 else 1 << (k - 1), "to_us": 1 << k, "count": counts[k]}
            for k in range(min(counts), max(counts) + 1)]


def _format_histogram(buckets, width=40):
    total = sum(b["count"] for b in buckets) or 1
    top = max(b["count"] for b in buckets) if buckets else 1
    return ["  %8d - %-8d µs %9d %5.1f%% |%-*s|"
            % (b["from_us"], b["to_us"], b["count"], 100.0 * b["count"] / total, width,
               "#" * int(round(width * b["count"] / float(top))))
            for b in buckets]


def _bench_net(dev, args):
    """Keep ``--depth`` frames looping through the back-end on each pair; round trips and CPU.

    Needs a back-end that returns every frame it receives (testpmd in io
    forward mode). Runs on the zero-copy burst path (``_bench_net_stream``).
    With ``--queues N`` each of the N queue pairs runs in its own thread;
    the report has the totals and, under "pairs", each pair's figures.
    """
    size = 64 if args.size is None else args.size   # its range: _check_bench_usage
    if size > dev.frame_max:   # what the device's MTU allows: known once connected
        raise _CliError("%s %d: frames are at most %d bytes (the MTU's frame) on this device"
                        % (_typed_option(args, "--size", "--bs"), size, dev.frame_max))
    # More frames in flight than receive buffers would make the back-end drop some.
    per_frame = -(-(size + _NET_HDR.size) // dev.rx_buffer_size)
    if args.depth * per_frame > dev.queue_size:
        raise _CliError("%s %d: at most %d frames of %d bytes fit the %d receive buffers"
                        % (_typed_option(args, "--depth", "--iodepth"), args.depth,
                           dev.queue_size // per_frame, size, dev.queue_size))
    pairs = dev.queue_pairs
    checked = [[0] for _ in range(pairs)]

    def after_ramp():
        for count in checked:
            count[0] = 0

    latencies, elapsed, cpu_self, cpu_backend = _bench_measured(
        args, lambda: [(_Latencies(args.depth),) for _ in range(pairs)],
        lambda pair, deadline, lat, tick: _bench_net_stream(
            dev, args, size, pair, deadline, lat[0], tick, checked[pair]), size, "net",
        after_ramp)
    latencies = [per_pair[0].values() for per_pair in latencies]
    merged = [latency for per_pair in latencies for latency in per_pair]
    report = _bench_report("net", None, size, args.depth, pairs, elapsed, merged, cpu_self,
                           cpu_backend)
    report["packed"] = dev.packed
    report["mrg_rxbuf"] = bool(dev.features & _NET_F_MRG_RXBUF)
    report["ramp_time"] = args.ramp_time
    report["verify"] = bool(args.verify)
    report["verified_frames"] = sum(count for count, in checked)
    if pairs > 1:
        report["pairs"] = []
        for pair, measured in enumerate(latencies):
            one = _bench_report("net", None, size, args.depth, 1, elapsed, measured, 0.0, None)
            report["pairs"].append({"pair": pair, "requests": one["requests"],
                                    "packets_per_s": one["packets_per_s"],
                                    "latency_us": one["latency_us"]})
    return report


def _bench_net_stream(dev, args, size, pair, deadline, latencies, tick=None, checked=None):
    """One pair's ``_bench_loop`` for ``_bench_net``, on the zero-copy burst path.

    ``--depth`` test frames are written once into ``tx_alloc`` buffers; each
    round posts them with ``tx_burst`` and takes the echoes with ``rx_burst``
    until all are back. Every round's echoes must have the lengths sent; the
    first round's and one in every ``_NET_BENCH_CHECK_EVERY`` after it (every
    round with ``--verify``) must also be byte-identical and in order: copying
    frames out of guest memory to compare them costs more than moving them on
    PyPy. ``checked``, a one-item list, counts the frames compared. A round
    is one batch of the loop: its latency runs from just before its
    ``tx_burst`` to the ``rx_burst`` that returned its last frame.
    """
    depth = args.depth
    source = bytes(dev.mac) if dev.mac else _TEST_MAC
    frames = [_test_frame(source, pair << 16 | i, size) for i in range(depth)]
    expected = b"".join(frames)
    lengths = [size] * depth
    slots = list(range(depth))
    echoed = [(True, ())]   # whether the round is compared; its frames, else their lengths
    rounds = [0]
    every = 1 if args.verify else _NET_BENCH_CHECK_EVERY
    tx_burst, rx_burst, timeout = dev.tx_burst, dev.rx_burst, args.timeout

    def post(_, now):
        tx_burst(buffers, lengths, pair)

    def reap():
        got = rx_burst(depth, timeout, pair)
        compare = rounds[0] % every == 0
        rounds[0] += 1
        if len(got) < depth:
            got = _bench_net_collect(dev, args, pair, got, depth, compare)
        elif not compare:
            got = list(map(len, got))
        echoed[0] = compare, got
        return slots

    def complete(_, now):
        compare, got = echoed[0]
        if compare:
            if b"".join(got) != expected:
                _bench_net_mismatch(dev, args, pair, frames, got)
            if checked is not None:
                checked[0] += depth
        elif got != lengths:
            _bench_net_mismatch(dev, args, pair, frames, got)

    buffers = dev.tx_alloc(depth, pair)
    try:
        for buffer, frame in zip(buffers, frames):
            buffer[:size] = frame
        _bench_loop(depth, deadline, post, reap, latencies, tick, complete)
    finally:
        try:
            dev.rx_release(pair)
            dev.tx_free(buffers, pair)
        except VhostUserError:
            pass   # the device is gone: the error that stopped the loop is the one to see


#: bench --type net compares the bytes of one round of echoes in this many (without --verify).
_NET_BENCH_CHECK_EVERY = 64


def _bench_net_collect(dev, args, pair, got, depth, compare):
    """A round's frames that came back in more than one burst: copies when ``compare``
    (the next burst releases the views of the last one), else their lengths."""
    keep = (lambda frames: list(map(bytes, frames))) if compare else \
        (lambda frames: list(map(len, frames)))
    got = keep(got)
    while len(got) < depth:
        more = dev.rx_burst(depth - len(got), args.timeout, pair)
        if not more:
            raise _CliError("%s: bench: %d frame(s)%s did not come back within %g s (the "
                            "back-end must return what it receives, like testpmd in io forward "
                            "mode%s)" % (args.socket, depth - len(got),
                                         " of pair %d" % pair if dev.queue_pairs > 1 else "",
                                         args.timeout, ", on as many queue pairs as --queues: "
                                         "testpmd queues=N" if pair else ""))
        got += keep(more)
    return got


def _bench_net_mismatch(dev, args, pair, frames, got):
    """Raise the _CliError that names the first echo of a round (or its length) unlike the
    frame sent."""
    for i, (frame, echo) in enumerate(zip(frames, got)):
        if echo.__class__ is int:   # only the length is known
            if echo != len(frame):
                what = "%d bytes, not %d" % (echo, len(frame))
                break
            continue
        echo = bytes(echo)
        if echo != frame:
            if len(echo) != len(frame):
                what = "%d bytes, not %d" % (len(echo), len(frame))
            else:
                at = next(k for k in range(len(frame)) if echo[k] != frame[k])
                what = "byte %d is %#04x, not %#04x" % (at, echo[at], frame[at])
            break
    else:
        what = "%d frames, not %d" % (len(got), len(frames))   # not reached: reap waits for all
    raise _CliError("%s: bench: frame %d of a round came back changed or out of order%s: %s"
                    % (args.socket, i, " on pair %d" % pair if dev.queue_pairs > 1 else "",
                       what))


def _typed_option(args, *spellings):
    """Which of an option's ``spellings`` the user typed (``--bs`` or ``--size``), for messages."""
    for word in reversed(getattr(args, "typed_argv", None) or ()):
        for spelling in spellings:
            if word == spelling or word.startswith(spelling + "="):
                return spelling
    return spellings[0]


############################################################################
# Device commands ##########################################################
############################################################################

# One handler per subcommand of probe, validate, blk, net and fs: each takes
# the parsed arguments and an output stream and returns the exit status. It
# opens with the argument types and the building blocks of the command table
# (the fs shell builds its own parser from them); the table itself and the
# parser that dispatches to these handlers are the Command line section's.

#: Exit statuses: 0 ok, 1 a failure reported in one line, 2 bad usage (argparse),
#: 141 (128 + SIGPIPE) when the reader of stdout went away.
_EXIT_FAILURE = 1
_EXIT_USAGE = 2
_EXIT_BROKEN_PIPE = 128 + 13


#: --type spellings: every DeviceType name in lower case, plus the short ones.
_TYPE_ALIASES = {"blk": DeviceType.BLOCK, "snd": DeviceType.SOUND, "9p": DeviceType.P9}
_CLI_TYPES = dict(((t.name.lower(), t) for t in DeviceType), **_TYPE_ALIASES)


def _int_arg(text):
    """An argparse type: an integer with an optional 0x prefix or k/M/G suffix."""
    import argparse
    _ascii_arg(text, "an integer")
    scale = {"k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    try:
        value = int(text[:-1] if scale > 1 else text, 0) * scale
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not an integer" % text)
    if value < 0:
        raise argparse.ArgumentTypeError("%r is negative" % text)
    return value


def _ascii_arg(text, kind):
    """Refuse what int() and float() take beyond ASCII (full-width digits: '\uff10')."""
    import argparse
    try:
        text.encode("ascii")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("%r is not %s (ASCII digits only)" % (text, kind))


def _hex_arg(text):
    """An argparse type: a whole Ethernet frame in hex (``ff:ff`` colons allowed), kept as text."""
    import argparse
    try:
        frame = bytes.fromhex(text.replace(":", " "))
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not bytes in hex (two hex digits a byte, "
                                         "e.g. ffffffffffff0200...)" % text)
    if len(frame) < _ETH_HLEN:
        raise argparse.ArgumentTypeError("%r is %d bytes; an Ethernet frame has at least %d"
                                         % (text, len(frame), _ETH_HLEN))
    return text


def _byte_arg(text):
    """An argparse type: one byte value, 0..255."""
    import argparse
    value = _int_arg(text)
    if value > 0xFF:
        raise argparse.ArgumentTypeError("%r is not a byte (0..255)" % text)
    return value


def _percent_arg(text):
    """An argparse type: a whole percentage, 0..100."""
    import argparse
    value = _int_arg(text)
    if value > 100:
        raise argparse.ArgumentTypeError("%r is not a percentage (0..100)" % text)
    return value


def _count_arg(text):
    """An argparse type: an integer of at least 1 (frames, requests in flight, queues)."""
    import argparse
    value = _int_arg(text)
    if value < 1:
        raise argparse.ArgumentTypeError("%r: at least 1 is needed" % text)
    return value


def _seconds_arg(text, allow_zero=False, allow_inf=False):
    """An argparse type: a finite number of seconds above 0 (or 0 if ``allow_zero``).

    "inf", "nan" and huge values would end in a traceback (settimeout
    overflows) or a run that does nothing, so they are usage errors; where
    waiting for ever makes sense (``allow_inf``) "inf" is accepted.
    """
    import argparse
    _ascii_arg(text, "a number")
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % text)
    if allow_inf and value == float("inf"):
        return value
    if not (value > 0 or allow_zero and value == 0) or not value <= threading.TIMEOUT_MAX:
        raise argparse.ArgumentTypeError("%r is not a number of seconds %s and at most %d" % (
            text, "from 0" if allow_zero else "above 0", threading.TIMEOUT_MAX))
    return value


def _rate_arg(text):
    """An argparse type: a finite rate above 0 (``--pps``: frames per second)."""
    import argparse
    _ascii_arg(text, "a number")
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("%r is not a rate above 0 (frames per second)" % text)
    return value
# -- the command table's building blocks -------------------------------------

def _opt(*names, **keywords):
    """One ``add_argument`` of the command table: its names and keywords, as given."""
    return names, keywords


def _one_of(*options, **keywords):
    """Options of the command table that exclude each other (a mutually exclusive group)."""
    return None, dict(keywords, options=options)


def _command(name, help, options=(), func=None, parents=("common",), commands=None,
             description=None):
    """One command of the table: a subparser with ``options`` and maybe ``commands`` of its own.

    ``parents`` names the shared option groups it takes ("common": -v and
    --timeout; "ring": --packed/--split); ``commands`` is (dest, metavar,
    the commands under it).
    """
    return {"name": name, "help": help, "options": options, "func": func, "parents": parents,
            "commands": commands, "description": description}


_SOCKET = _opt("socket", metavar="SOCKET")
_JSON = _opt("--json", action="store_true", help="print one JSON object")
_OFFSET = _opt("offset", type=_int_arg, metavar="OFFSET")
_LENGTH = _opt("length", type=_int_arg, metavar="LENGTH")
_RANGE = (_OFFSET, _LENGTH)
_RING_OPTIONS = (_one_of(
    _opt("--packed", dest="packed", action="store_const", const=True,
         help="require packed virtqueues (RING_PACKED); default: packed when the back-end "
              "offers it"),
    _opt("--split", dest="packed", action="store_const", const=False,
         help="use split virtqueues even when packed ones are offered")),)
#: bench's: split rings unless --packed. This front-end posts a split ring's
#: prebuilt descriptors with one avail entry each, while a packed ring's
#: descriptors are rewritten at every post; split is its faster layout.
_BENCH_RING = _one_of(
    _opt("--packed", dest="packed", action="store_const", const=True,
         help="use packed virtqueues (RING_PACKED required); default: split, this "
              "front-end's faster layout"),
    _opt("--split", dest="packed", action="store_const", const=False,
         help="use split virtqueues (the default)"))
_PAYLOAD = _one_of(
    _opt("--payload-file", metavar="FILE",
         help="send FILE's bytes (a whole Ethernet frame) every time"),
    _opt("--payload-hex", type=_hex_arg, metavar="HEX",
         help="send these bytes every time (e.g. ffffffffffff0200...)"))
_SECONDS_OR_ZERO = functools.partial(_seconds_arg, allow_zero=True)

#: The ``fs`` commands, for the command line and the shell alike.
_FS_COMMANDS = (
    _command("ls", "list directories", (
        _opt("-l", dest="long", action="store_true", help="long listing"),
        _opt("-a", dest="all", action="store_true", help="include names starting with ."),
        _opt("paths", nargs="*", metavar="PATH"))),
    _command("tree", "the directory tree under PATH",
             (_opt("path", nargs="?", default="", metavar="PATH"),)),
    _command("stat", "everything stat(2) says of PATH", (_opt("path", metavar="PATH"),)),
    _command("cat", "print files", (_opt("paths", nargs="+", metavar="PATH"),)),
    _command("get", "copy REMOTE to a local file", (
        _opt("remote", metavar="REMOTE"),
        _opt("local", nargs="?", metavar="LOCAL",
             help="local file or directory (default: REMOTE's name, here)"))),
    _command("put", "copy a local file to REMOTE", (
        _opt("local", metavar="LOCAL"),
        _opt("remote", metavar="REMOTE", help="file or existing directory in the share"))),
    _command("mkdir", "make directories", (
        _opt("-p", dest="parents", action="store_true",
             help="make parents as needed; no error if it exists"),
        _opt("paths", nargs="+", metavar="PATH"))),
    _command("rm", "remove files (and with -r, directories)", (
        _opt("-r", "-R", dest="recursive", action="store_true",
             help="remove directories and their contents"),
        _opt("paths", nargs="+", metavar="PATH"))),
    _command("mv", "rename or move into a directory",
             (_opt("src", metavar="SRC"), _opt("dst", metavar="DST"))),
    _command("ln", "make a hard link (-s: symbolic)", (
        _opt("-s", dest="symbolic", action="store_true", help="symbolic link"),
        _opt("target", metavar="TARGET"), _opt("path", metavar="PATH"))),
    _command("df", "size, use and inodes of the share"),
)


def _add_commands(parser, commands, parents, required=True):
    """Add ``commands`` (dest, metavar, table) to ``parser``; returns its subparsers action."""
    dest, metavar, table = commands
    actions = parser.add_subparsers(dest=dest, metavar=metavar)
    actions.required = required  # 3.6 has no add_subparsers(required=)
    for command in table:
        keywords = {"help": command["help"]}
        if command["description"] is not None:
            keywords["description"] = command["description"]
        sub = actions.add_parser(command["name"], parents=[parents[p] for p in command["parents"]
                                                           if p in parents], **keywords)
        _add_options(sub, command["options"])
        if command["commands"] is not None:
            _add_commands(sub, command["commands"], parents)
        if command["func"] is not None:
            sub.set_defaults(func=command["func"])
    return actions


def _add_options(parser, options):
    """``add_argument`` each of ``options`` (``_opt``, ``_one_of``) on ``parser`` or a group."""
    for names, keywords in options:
        if names is None:
            group = parser.add_mutually_exclusive_group(required=keywords.get("required", False))
            _add_options(group, keywords["options"])
        else:
            parser.add_argument(*names, **keywords)


def _transfer_suffix(exc):
    """"; read stopped after N bytes ..." for an error that ended a transfer, else ""."""
    note = _transfer_note(exc)
    return "; " + note if note else ""


def _probe(client, path, device_type=None, config_size=None):
    """Everything a back-end tells about itself, negotiating only what that needs.

    Returns the dict ``probe --json`` prints (its keys are stable). A
    ``device_type`` given is used as is (``--type`` overrides the guess).
    """
    features = client.get_features()
    offered = None
    used = 0
    if features & VirtioFeature.PROTOCOL_FEATURES:
        offered = client.get_protocol_features()
        used = offered & (_P.MQ | _P.CONFIG | _P.CONFIGURE_MEM_SLOTS | _P.SHMEM)
        if used:
            client.set_protocol_features(used)
    source = "given"
    if device_type is None:   # --type overrides the guess, whatever the bits suggest
        device_type, why, _ = _guess_device_type(features, offered)
        source = "guessed: %s" % why if device_type is not None else "unknown"
    info = {
        "device_type": device_type.name.lower() if device_type is not None else None,
        "device_type_source": source,
        "features": features,
        "feature_names": VirtioFeature.names(features, device_type),
        "protocol_features": None if offered is None else int(offered),
        "protocol_feature_names": [] if offered is None else ProtocolFeature.names(offered),
        "queue_num": client.get_queue_num() if used & _P.MQ else None,
        "max_mem_slots": client.get_max_mem_slots() if used & _P.CONFIGURE_MEM_SLOTS else None,
        "shared_memory": None,
        "config": None,
        "config_fields": {},
        "config_error": None,
    }
    if used & _P.SHMEM:
        info["shared_memory"] = [{"shmid": shmid, "size": size}
                                 for shmid, size in client.get_shmem_config().regions()]
    if not used & _P.CONFIG:
        info["config_error"] = "CONFIG not offered"
        return info
    if config_size is None:
        config_size = _device_config_size(device_type, features)
    if not config_size:
        info["config_error"] = "layout unknown for this device type (see --config-size)"
        return info
    try:
        data = client.get_config(0, config_size)
    except BackendError as exc:
        info["config_error"] = str(exc)
        return info
    info["config"] = data.hex()
    info["config_fields"] = dict(_decode_device_config(device_type, features, data))
    return info


def _wrap_names(names, indent="  ", width=79):
    lines = []
    line = indent
    for name in names:
        if len(line) + len(name) + 1 > width and line.strip():
            lines.append(line)
            line = indent
        line += ("" if line == indent else " ") + name
    if line.strip():
        lines.append(line)
    return lines


def _hexdump(data, indent="  "):
    return ["%s%04x  %s" % (indent, i, " ".join("%02x" % b for b in bytearray(data[i:i + 16])))
            for i in range(0, len(data), 16)]


def _format_probe(path, info):
    """``probe``'s human-readable report, as lines."""
    row = "%-20s %s"
    lines = [row % ("socket", path)]
    kind = info["device_type"] or "unknown (--type names the device bits)"
    if info["device_type"] and info["device_type_source"] != "given":
        kind += " (%s; --type overrides)" % info["device_type_source"]
    lines.append(row % ("device type", kind))
    lines.append(row % ("virtio features", "%#x" % info["features"]))
    lines += _wrap_names(info["feature_names"])
    if info["protocol_features"] is None:
        lines.append(row % ("protocol features", "none (PROTOCOL_FEATURES not offered)"))
    else:
        lines.append(row % ("protocol features", "%#x" % info["protocol_features"]))
        lines += _wrap_names(info["protocol_feature_names"])
    lines.append(row % ("queues", info["queue_num"] if info["queue_num"] is not None
                        else "not reported (MQ not offered)"))
    lines.append(row % ("max memory slots", info["max_mem_slots"]
                        if info["max_mem_slots"] is not None
                        else "not reported (CONFIGURE_MEM_SLOTS not offered)"))
    shmem = info["shared_memory"]
    if shmem is None:
        lines.append(row % ("shared memory", "not reported (SHMEM not offered)"))
    else:
        lines.append(row % ("shared memory", ", ".join(
            "region %d: %d bytes" % (r["shmid"], r["size"]) for r in shmem) or "none"))
    if info["config"] is None:
        lines.append(row % ("device config", "not read: %s" % info["config_error"]))
        return lines
    data = bytes.fromhex(info["config"])
    lines.append(row % ("device config", "%d bytes" % len(data)))
    lines += _hexdump(data)
    fields = info["config_fields"]
    width = max([len(name) for name in fields] or [0])
    for name, value in fields.items():
        text = str(value)
        if name == "capacity":
            text += " sectors (%s)" % _format_bytes(value * 512)
        lines.append("  %-*s  %s" % (width, name, text))
    return lines


def _format_bytes(count):
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return "%.4g %s" % (count / float(1 << shift), unit)
    return "%d bytes" % count


def _device_type_arg(text):
    """--type of probe and validate: a type name (blk, net, fs, ...) or any virtio device ID."""
    import argparse
    if text.lower() in _CLI_TYPES:
        return _CLI_TYPES[text.lower()]
    try:
        return DeviceType(_int_arg(text))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError("%r is neither a device type (blk, net, fs, gpu, "
                                         "vsock, ...) nor a virtio device ID (0-65535)" % text)


def _cmd_probe(args, out):
    wanted = args.type
    if args.config_size is not None and not 1 <= args.config_size <= MAX_CONFIG_SIZE:
        raise _UsageError("--config-size %d: the config space holds 1 to %d bytes"
                          % (args.config_size, MAX_CONFIG_SIZE))
    with _cli_connect(args.socket, args.timeout) as client:
        info = _probe(client, args.socket, wanted, args.config_size)
    if args.json:
        import json
        out.write(json.dumps(info, indent=2) + "\n")
    else:
        out.write("\n".join(_format_probe(args.socket, info)) + "\n")
    return 0


def _cmd_validate(args, out):
    only = [p for p in (args.only or "").split(",") if p] or None
    checker = _Validator(args.socket, args.type, only, args.timeout, args.destructive)
    if only and not checker.selected():
        raise _UsageError("--only %s matches no check (ids: %s)"
                          % (args.only, " ".join(c.id for c in _V_CHECKS)))
    _check_socket(args.socket)
    report = checker.run()
    if args.json:
        import json
        out.write(json.dumps(report, indent=2) + "\n")
    elif args.tap:
        out.write(_validate_tap(report))
    else:
        out.write(_validate_table(report))
    bad = report["summary"]["fail"] + report["summary"]["error"]
    return _EXIT_FAILURE if bad else 0
# -- blk ----------------------------------------------------------------------

def _cmd_blk(args, out):
    with _open_device(args, BlockDevice, DeviceType.BLOCK) as dev:
        return _BLK_ACTIONS[args.action](dev, args, out)


def _blk_info(dev, args, out):
    topology = dev.topology
    info = {
        "capacity": dev.capacity,
        "block_size": dev.block_size,
        "read_only": bool(dev.read_only),
        "num_queues": dev.num_queues,
        "id": dev.get_id().decode("ascii", "backslashreplace"),
        "max_transfer": dev.max_transfer,
        "write_cache": dev.writeback,
        "topology": None if topology is None else dict(zip(
            ("physical_block_size", "alignment_offset", "min_io_size", "opt_io_size"),
            # min_io_size and opt_io_size count logical blocks (spec 5.2.4).
            (dev.block_size << topology[0], topology[1] * dev.block_size,
             topology[2] * dev.block_size, topology[3] * dev.block_size))),
        "discard": None,
        "write_zeroes": None,
    }
    config = dev.config
    if dev.features & _BLK_F_DISCARD:
        info["discard"] = {"max_bytes": dev.max_discard_sectors * _SECTOR,
                           "max_segments": config.max_discard_seg,
                           "alignment": config.discard_sector_alignment * _SECTOR}
    if dev.features & _BLK_F_WRITE_ZEROES:
        info["write_zeroes"] = {"max_bytes": dev.max_write_zeroes_sectors * _SECTOR,
                                "max_segments": config.max_write_zeroes_seg,
                                "may_unmap": bool(config.write_zeroes_may_unmap)}
    if args.json:
        import json
        out.write(json.dumps(info, indent=2) + "\n")
        return 0
    yes_no = lambda flag: "yes" if flag else "no"  # noqa: E731
    size = lambda count: "%s (%d bytes)" % (_format_bytes(count), count) \
        if count >= 1024 else "%d bytes" % count  # noqa: E731
    rows = [("capacity", "%s, %d sectors" % (size(dev.capacity), dev.capacity // _SECTOR)),
            ("block size", size(dev.block_size)),
            ("read only", yes_no(info["read_only"])),
            ("write cache", "yes (writeback: flush makes writes durable)" if dev.writeback
             else "no (writethrough)"),
            ("queues", str(dev.num_queues)),
            ("serial", info["id"]),
            ("max transfer", size(dev.max_transfer) + " per request")]
    topo = info["topology"]
    rows.append(("topology", "not reported" if topo is None else
                 "physical block %s, alignment offset %s, minimum I/O %s, optimal I/O %s"
                 % tuple(size(topo[k]) for k in ("physical_block_size", "alignment_offset",
                                                 "min_io_size", "opt_io_size"))))
    discard = info["discard"]
    rows.append(("discard", "no" if discard is None else
                 "yes, up to %s per request, %d segment(s), alignment %s"
                 % (size(discard["max_bytes"]), discard["max_segments"],
                    size(discard["alignment"]))))
    zeroes = info["write_zeroes"]
    rows.append(("write zeroes", "no" if zeroes is None else
                 "yes, up to %s per request, %d segment(s), may unmap: %s"
                 % (size(zeroes["max_bytes"]), zeroes["max_segments"],
                    yes_no(zeroes["may_unmap"]))))
    out.write("".join("%-13s %s\n" % row for row in rows))
    return 0


#: Bytes one step of a streamed ``blk`` transfer moves: a 1 GiB read or write
#: needs a few of these in memory, never the whole transfer.
_CLI_CHUNK = 4 << 20


class _TransferProgress:
    """Bytes, rate and ETA on stderr, once a transfer has run a second; terminal only.

    With ``what`` (the action), ``fail(exc)`` notes on a failure or an
    interruption how many bytes were done, and the offset reached when the
    transfer started at ``offset``; the error line ends with it. As a
    context manager it does that for an exception leaving the block, and
    erases its line.
    """

    moved = 0     # the bytes done, as the last update() said

    def __init__(self, total, stream=None, what=None, offset=None):
        self.stream = sys.stderr if stream is None else stream
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total = total
        self.what = what
        self.offset = offset
        self.start = time.monotonic()
        self.next_draw = self.start + 1.0
        self.drawn = False

    def fail(self, exc):
        """Note on ``exc`` what was done before it (see ``_transfer_note``)."""
        text = "%s stopped after %d bytes" % (self.what, self.moved)
        if self.total is not None:
            text += " of %d" % self.total
        if self.offset is not None:
            text += ", at offset %d" % (self.offset + self.moved)
        _note_transfer(exc, text)

    def update(self, done):
        self.moved = done
        now = time.monotonic()
        if not self.enabled or now < self.next_draw:
            return
        self.next_draw = now + 0.5
        rate = done / (now - self.start)
        text = "\r%s" % _format_bytes(done)
        if self.total is not None:
            eta = (self.total - done) / rate if rate else 0
            text += " of %s (%d%%)" % (_format_bytes(self.total), 100 * done // (self.total or 1))
        text += "  %s/s" % _format_bytes(int(rate))
        if self.total is not None:
            text += "  ETA %d:%02d" % divmod(int(eta), 60)
        self.stream.write(text + "\033[K")
        self.stream.flush()
        self.drawn = True

    def done(self):
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        """A failure (any, Ctrl-C too) notes what was done when there is a ``what``."""
        if exc is not None and self.what is not None:
            self.fail(exc)
        self.done()


def _note_transfer(exc, text):
    """Attach to ``exc`` what a transfer did before it, for the error line to end with."""
    if not _stdout_gone(exc):
        exc.cli_transfer_note = text


def _transfer_note(exc):
    """Take (once) the note ``_note_transfer`` left on ``exc`` or an exception it came from."""
    todo, seen = [exc], []
    while todo and len(seen) < 20:
        exc = todo.pop(0)
        if exc is None or any(exc is e for e in seen):
            continue
        seen.append(exc)
        note = vars(exc).pop("cli_transfer_note", None)
        if note is not None:
            return note
        # A file's close() failing after its read failed: the read's note is in the context.
        todo += [exc.__cause__, exc.__context__]
    return None


def _stdout_gone(exc):
    """True for the EPIPE of writing to stdout after its reader left (no file name: not a
    file-system error the back-end returned)."""
    return isinstance(exc, BrokenPipeError) and exc.filename is None


class _HexdumpC:
    """``hexdump -C``'s canonical dump, fed piece by piece.

    Each line is the offset, 16 bytes in hex in two groups of 8 and the
    bytes as ASCII between bars; a line equal to the one before is printed
    as one ``*`` for the whole run; the offset after the last byte ends the
    dump (nothing at all for no bytes at offset 0), as bsdextrautils' does.
    """

    _PRINTABLE = bytes(b if 0x20 <= b < 0x7F else 0x2E for b in range(256))

    def __init__(self, write, offset=0):
        self.write = write
        self.offset = offset
        self.pending = b""
        self.previous = None
        self.starred = False

    def feed(self, data):
        data = self.pending + bytes(data)
        full = len(data) - len(data) % 16
        lines = []
        for i in range(0, full, 16):
            line = data[i:i + 16]
            if line == self.previous:
                if not self.starred:
                    lines.append("*")
                    self.starred = True
            else:
                lines.append(self._line(line))
                self.previous = line
                self.starred = False
            self.offset += 16
        self.pending = data[full:]
        if lines:
            self.write("\n".join(lines) + "\n")

    def close(self):
        if self.pending:
            # A short last line is never folded into a '*'.
            self.write(self._line(self.pending) + "\n")
            self.offset += len(self.pending)
            self.pending = b""
        if self.offset:   # no bytes at offset 0: no output at all
            self.write("%08x\n" % self.offset)

    def _line(self, line):
        return "%08x  %-23s  %-23s  |%s|" % (
            self.offset, " ".join("%02x" % b for b in bytearray(line[:8])),
            " ".join("%02x" % b for b in bytearray(line[8:])),
            line.translate(self._PRINTABLE).decode("ascii"))


def _blk_check_range(dev, what, offset, length):
    """Refuse a range past the capacity in one line, before anything is allocated or sent."""
    if offset + length > dev.capacity:
        raise _CliError("%s: %d bytes at offset %d end past the capacity of %d bytes (%s)"
                        % (what, length, offset, dev.capacity, _format_bytes(dev.capacity)))


def _blk_stream(dev, offset, length, progress=None):
    """Yield the bytes at OFFSET..OFFSET+LENGTH, any alignment, in bounded pieces.

    Reads the blocks that cover the range, at most ``_CLI_CHUNK`` bytes at a
    time, into one buffer in guest memory (``alloc``: zero-copy, nothing
    allocated per step, so even PyPy's collector has no garbage to fall
    behind on), and yields memoryviews of the wanted slice, valid until the
    next step; qemu-io reads unaligned requests the same way.
    """
    block = dev.block_size
    start = offset - offset % block
    end = offset + length
    aligned_end = -(-end // block) * block
    if aligned_end == start:
        return
    buffer = dev.alloc(min(_CLI_CHUNK, aligned_end - start))
    position = start
    try:
        while position < aligned_end:
            count = min(len(buffer), aligned_end - position)
            if count == len(buffer):
                dev.readinto(position, buffer)
            else:
                with buffer[:count] as head:   # the last step: a copy, once
                    dev.readinto(position, head)
            low = max(offset, position) - position
            high = min(end, position + count) - position
            piece = buffer[low:high]
            try:
                yield piece
            finally:
                piece.release()
            position += count
            if progress is not None:
                progress.update(min(end, position) - offset)
    finally:
        dev.free(buffer)


def _binary_stdout(out):
    """The byte stream under ``out`` (flushed), or None when there is none or it is a terminal."""
    binary = getattr(out, "buffer", None)
    if binary is None or out.isatty():  # never dump raw bytes on a terminal
        return None
    out.flush()
    return binary


def _blk_read(dev, args, out):
    _blk_check_range(dev, "read", args.offset, args.length)
    binary = None if args.hexdump else _binary_stdout(out)
    target = None
    if args.output:
        target = open(args.output, "wb")
    elif binary is not None:
        target = binary
    dump = _HexdumpC(out.write, args.offset) if target is None else None
    progress = _TransferProgress(args.length, what="read", offset=args.offset)
    stream = _blk_stream(dev, args.offset, args.length, progress)
    try:
        with progress:
            for piece in stream:
                if dump is not None:
                    dump.feed(piece)
                else:
                    target.write(piece)
            if dump is not None:
                dump.close()
            else:
                target.flush()
    finally:
        stream.close()   # its buffer goes back now, not when a collector gets to it
        if args.output and target is not None:
            target.close()
    return 0


def _blk_verify(dev, args, out):
    """Compare the bytes at OFFSET..OFFSET+LENGTH with a pattern or a file (qemu-io read -P)."""
    _blk_check_range(dev, "verify", args.offset, args.length)
    source = None
    if args.file is not None:
        source = open(args.file, "rb")
    try:
        if source is not None:
            import stat
            st = os.fstat(source.fileno())
            available = st.st_size if stat.S_ISREG(st.st_mode) else args.length
            if available < args.length:
                raise _CliError("verify: %s has %d bytes, fewer than the %d to compare"
                                % (args.file, available, args.length))
        progress = _TransferProgress(args.length)
        checked = 0
        stream = _blk_stream(dev, args.offset, args.length, progress)
        try:
            for piece in stream:
                if source is not None:
                    expected = source.read(len(piece))
                    if len(expected) < len(piece):
                        raise _CliError("verify: %s ended after %d bytes, before the %d to "
                                        "compare" % (args.file, checked + len(expected),
                                                     args.length))
                else:
                    expected = bytes((args.pattern,)) * len(piece)
                if piece != expected:
                    at = next(i for i in range(len(piece)) if piece[i] != expected[i])
                    raise _CliError(
                        "verify: mismatch at offset %d: expected %#04x, found %#04x (%d "
                        "byte(s) matched before it)" % (args.offset + checked + at,
                                                         expected[at], piece[at], checked + at))
                checked += len(piece)
        finally:
            stream.close()
            progress.done()
    finally:
        if source is not None:
            source.close()
    out.write("verified %d bytes at offset %d: all match %s\n"
              % (args.length, args.offset, args.file if source is not None
                 else "pattern %#04x" % args.pattern))
    return 0


def _blk_write(dev, args, out):
    """Stream FILE or stdin to OFFSET in bounded steps; unaligned ends need --pad or --rmw."""
    if dev.read_only:
        raise ReadOnlyDevice("WRITE: the device is read-only (VIRTIO_BLK_F_RO)")
    source = open(args.input, "rb") if args.input else sys.stdin.buffer
    try:
        return _blk_write_from(dev, args, out, source)
    finally:
        if args.input:
            source.close()


def _blk_write_from(dev, args, out, source):
    import stat
    block = dev.block_size
    offset = args.offset
    head = offset % block
    length = None   # known up front for a regular file: checked before anything is written
    st = os.fstat(source.fileno())
    if stat.S_ISREG(st.st_mode):
        length = max(0, st.st_size - source.tell())
        _blk_check_range(dev, "write", offset, length)
    if (head or (length or 0) % block) and not (args.pad or args.rmw):
        raise _CliError("write: offset %d and length %s are not both multiples of the block "
                        "size %d; give --pad (zero-fill the partial blocks) or --rmw (read "
                        "them and keep their other bytes)"
                        % (offset, "unknown (stdin)" if length is None else length, block))
    position = offset - head
    # Staged in guest memory (alloc): the data is copied once, from the file
    # straight into the buffer the device reads, and nothing is allocated
    # per step. A step is a whole number of blocks.
    staging = dev.alloc(max(block, _CLI_CHUNK - _CLI_CHUNK % block))
    try:
        if head:
            staging[:head] = dev.read(position, block)[:head] if args.rmw else bytes(head)
        fill = head
        progress = _TransferProgress(length, what="write", offset=offset)
        total = 0
        with progress:
            while True:
                with staging[fill:] as room:
                    count = source.readinto(room)
                if count:
                    if offset + total + count > dev.capacity:
                        raise _CliError("write: the data does not fit: more than the %d bytes "
                                        "between offset %d and the capacity %d; wrote the "
                                        "first %d" % (dev.capacity - offset, offset,
                                                      dev.capacity, max(0, position - offset)))
                    total += count
                    fill += count
                if fill == len(staging) or not count:
                    ready = fill - fill % block
                    if ready == len(staging):
                        dev.write(position, staging)   # zero-copy
                    elif ready:
                        with staging[:ready] as part:
                            dev.write(position, part)
                    position += ready
                    fill -= ready
                    staging[:fill] = staging[ready:ready + fill]   # < 1 block: no overlap
                    progress.update(max(0, position - offset))
                if not count:
                    break
        tail = fill
        if tail:
            if not (args.pad or args.rmw):
                raise _CliError("write: the data ends %d bytes into the %d-byte block at "
                                "offset %d; wrote the %d bytes before it; give --pad or --rmw "
                                "for the last block" % (tail, block, position,
                                                        position - offset))
            try:
                staging[tail:block] = dev.read(position, block)[tail:] if args.rmw \
                    else bytes(block - tail)
                with staging[:block] as last:
                    dev.write(position, last)
            except BaseException as exc:
                progress.fail(exc)   # the last block's failure says what was done too
                raise
    finally:
        dev.free(staging)
    how = ""
    if head or tail:
        end = offset + total
        partial = len(set(([offset // block] if head else [])
                          + ([end // block] if end % block else [])))
        if args.rmw:
            how = " (read-modify-write of %d partial block(s))" % partial
        else:
            how = " (zero-padded to whole %d-byte blocks: %d byte(s) before, %d after)" % (
                block, head, block - tail if tail else 0)
    out.write("wrote %d bytes at offset %d%s\n" % (total, offset, how))
    return 0


def _blk_flush(dev, args, out):
    dev.flush()
    return 0


def _blk_discard(dev, args, out):
    dev.discard(args.offset, args.length)
    return 0


def _blk_write_zeroes(dev, args, out):
    dev.write_zeroes(args.offset, args.length)
    return 0


_BLK_ACTIONS = {
    "info": _blk_info, "read": _blk_read, "write": _blk_write, "verify": _blk_verify,
    "flush": _blk_flush,
    "discard": _blk_discard, "write-zeroes": _blk_write_zeroes,
}
# -- net ----------------------------------------------------------------------


def _format_mac(mac):
    return ":".join("%02x" % b for b in bytearray(mac))


def _frame_source(dev, args, size):
    """A function seq -> frame: the frame of --payload-file/--payload-hex, else a test frame.

    ``size`` is the generated frames' size in bytes.
    """
    if args.payload_file is not None or args.payload_hex is not None:
        if args.payload_file is not None:
            with open(args.payload_file, "rb") as f:
                frame = f.read()
        else:
            frame = bytes.fromhex(args.payload_hex.replace(":", " "))   # checked by _hex_arg
        if len(frame) < _ETH_HLEN:
            raise _CliError("the frame has %d bytes; an Ethernet frame has at least %d"
                            % (len(frame), _ETH_HLEN))
        return lambda seq: frame
    if size < _TEST_FRAME_HEADER.size:
        raise _CliError("test frames carry a sequence number and need at least %d bytes "
                        "(%d data bytes), not %d" % (_TEST_FRAME_HEADER.size,
                                                     _TEST_FRAME_HEADER.size - _ETH_HLEN, size))
    src = bytes(dev.mac) if dev.mac else _TEST_MAC
    return lambda seq: _test_frame(src, seq, size)


def _cmd_net(args, out):
    if args.action == "send" and args.read is None and args.payload_file is None \
            and args.payload_hex is None:
        _check_frame_size("--size", args.size)
    with _open_device(args, NetDevice, DeviceType.NET) as dev:
        return _NET_ACTIONS[args.action](dev, args, out)


# pcap, the classic capture format tcpdump and Wireshark read and write
# (https://www.tcpdump.org/manpages/pcap-savefile.5.html): a global header,
# then per frame a record header (seconds, microseconds, captured length,
# length on the wire) and the bytes. Written in the host's byte order;
# readers tell it from the magic number, and so does _read_pcap.
_PCAP_HEADER_FORMAT = "IHHiIII"   # magic, major, minor, thiszone, sigfigs, snaplen, link type
_PCAP_RECORD_FORMAT = "IIII"       # seconds, µs (or ns), captured, original length
_PCAP_HEADER = struct.Struct("=" + _PCAP_HEADER_FORMAT)
_PCAP_RECORD = struct.Struct("=" + _PCAP_RECORD_FORMAT)
_PCAP_MAGIC_USEC = 0xA1B2C3D4
_PCAP_MAGIC_NSEC = 0xA1B23C4D
_LINKTYPE_ETHERNET = 1
_PCAP_SNAPLEN = 262144


class _PcapWriter:
    """Frames to a classic pcap stream (LINKTYPE_ETHERNET, µs timestamps), flushed per frame."""

    def __init__(self, stream):
        self.stream = stream
        stream.write(_PCAP_HEADER.pack(_PCAP_MAGIC_USEC, 2, 4, 0, 0, _PCAP_SNAPLEN,
                                       _LINKTYPE_ETHERNET))
        stream.flush()

    def write(self, frame, timestamp):
        usec = int(round(timestamp * 1e6))
        self.stream.write(_PCAP_RECORD.pack(usec // 1000000, usec % 1000000, len(frame),
                                            len(frame)) + bytes(frame))
        self.stream.flush()   # `-w - | tcpdump -r -` shows each frame as it comes


def _read_pcap(stream, name):
    """Yield the frames of a classic pcap stream (either byte order, µs or ns stamps)."""
    header = stream.read(_PCAP_HEADER.size)
    magic = header[:4]
    for order in "<>":
        if len(magic) == 4 and struct.unpack(order + "I", magic)[0] in (_PCAP_MAGIC_USEC,
                                                                        _PCAP_MAGIC_NSEC):
            break
    else:
        raise _CliError("%s: not a pcap file (magic %s; pcapng is not read, convert it with "
                        "`tcpdump -r FILE -w OUT`)" % (name, magic.hex() or "missing"))
    if len(header) < _PCAP_HEADER.size:
        raise _CliError("%s: pcap header cut short at %d bytes" % (name, len(header)))
    fields = struct.unpack(order + _PCAP_HEADER_FORMAT, header)
    if fields[6] != _LINKTYPE_ETHERNET:
        raise _CliError("%s: link type %d, only Ethernet (1) can be sent"
                        % (name, fields[6]))
    record = struct.Struct(order + _PCAP_RECORD_FORMAT)
    number = 0
    while True:
        head = stream.read(record.size)
        if not head:
            return
        number += 1
        if len(head) < record.size:
            raise _CliError("%s: frame %d: record header cut short" % (name, number))
        captured = record.unpack(head)[2]
        if captured > _PCAP_SNAPLEN:
            raise _CliError("%s: frame %d: captured length %d is more than %d"
                            % (name, number, captured, _PCAP_SNAPLEN))
        frame = stream.read(captured)
        if len(frame) < captured:
            raise _CliError("%s: frame %d: %d of its %d bytes are missing"
                            % (name, number, captured - len(frame), captured))
        yield frame


def _net_send(dev, args, out):
    if args.read is not None:
        return _net_replay(dev, args, out)
    make = _frame_source(dev, args, args.size)
    # In batches: memory stays bounded for any -n, and each send_many's
    # --timeout covers one batch, not the whole run.
    sent = length = 0
    while sent < args.count:
        frames = [make(seq) for seq in range(sent, min(args.count, sent + _NET_SEND_BATCH))]
        dev.send_many(frames)
        sent += len(frames)
        length = len(frames[0])
    dev.flush()
    out.write("sent %d frame(s) of %d bytes\n" % (sent, length))
    return 0


_NET_SEND_BATCH = 256


def _net_replay(dev, args, out):
    """``send -r FILE``: the frames of a pcap, ``--loop`` times, at ``--pps`` (tcpreplay)."""
    if args.payload_file is not None or args.payload_hex is not None:
        raise _UsageError("send: -r takes the frames from the pcap file; drop --payload-*")
    clock = time.monotonic
    sent = sent_bytes = 0
    start = clock()
    loop = 0
    batch = []

    def push():
        dev.send_many(batch)
        del batch[:]

    # Ctrl-C ends a replay (--loop 0 runs until then) between two frames, never
    # inside send_many (see _SigintFlag); what was queued still goes out.
    with _SigintFlag() as sigint:
        while (args.loop == 0 or loop < args.loop) and not sigint.stopped:
            loop += 1
            with open(args.read, "rb") as f:
                for frame in _read_pcap(f, args.read):
                    if sigint.stopped:
                        break
                    if len(frame) < _ETH_HLEN:
                        raise _CliError("%s: frame %d has %d bytes; an Ethernet frame has at "
                                        "least %d" % (args.read, sent + 1, len(frame),
                                                      _ETH_HLEN))
                    if args.pps:
                        delay = start + sent / args.pps - clock()
                        if delay > 0:
                            push()
                            while delay > 0 and not sigint.stopped:
                                time.sleep(min(delay, _SIGINT_POLL))
                                delay = start + sent / args.pps - clock()
                            if sigint.stopped:
                                break
                    batch.append(frame)
                    sent += 1
                    sent_bytes += len(frame)
                    if len(batch) >= 32:
                        push()
            push()
            if not sent:
                break   # an empty capture: looping it forever would send nothing forever
    dev.flush()
    out.write("sent %d frame(s) (%d bytes) from %s in %.3f s, %d loop(s)\n"
              % (sent, sent_bytes, args.read, clock() - start, loop))
    return 0


_ETHERTYPE_NAMES = {0x0800: "IPv4", 0x0806: "ARP", 0x86DD: "IPv6", 0x8100: "802.1Q",
                    0x88A8: "802.1Q-QinQ", 0x88CC: "LLDP", 0x8035: "Reverse ARP"}


def _tcpdump_line(frame, timestamp):
    """One frame as ``tcpdump -e -n`` heads it: time, MACs, ethertype, length."""
    stamp = "%s.%06d" % (time.strftime("%H:%M:%S", time.localtime(timestamp)),
                         int(timestamp % 1 * 1e6))
    if len(frame) < _ETH_HLEN:
        return "%s [|ether] length %d (runt)" % (stamp, len(frame))
    ethertype = struct.unpack(">H", frame[12:14])[0]
    return "%s %s > %s, ethertype %s (%#06x), length %d" % (
        stamp, _format_mac(frame[6:12]), _format_mac(frame[:6]),
        _ETHERTYPE_NAMES.get(ethertype, "Unknown"), ethertype, len(frame))


def _tcpdump_hex(frame):
    """The frame as ``tcpdump -xx`` dumps it: offset, then 16 bytes in groups of two."""
    frame = bytes(frame)
    lines = []
    for i in range(0, len(frame), 16):
        line = frame[i:i + 16].hex()
        lines.append("\t0x%04x:  %s" % (i, " ".join(line[j:j + 4]
                                                     for j in range(0, len(line), 4))))
    return lines


#: How often a loop under ``_SigintFlag`` looks at the flag (seconds).
_SIGINT_POLL = 0.1


class _SigintFlag:
    """While active (main thread), Ctrl-C sets ``stopped`` instead of raising.

    A capture loop then ends between two frames, never inside one: a
    KeyboardInterrupt between receiving a frame and writing it lost that
    frame and left the count one ahead of the file, or cut a pcap record in
    half. The loop polls ``stopped`` every ``_SIGINT_POLL`` seconds.
    """

    stopped = False

    def __enter__(self):
        import signal
        self._saved = None
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            self._saved = signal.signal(signal.SIGINT, self._stop)
        return self

    def _stop(self, signum, frame):
        self.stopped = True

    def __exit__(self, *exc):
        import signal
        if self._saved is not None:
            signal.signal(signal.SIGINT, self._saved)


def _net_recv(dev, args, out):
    """Print (or write as pcap) the frames that arrive until -c, --wait or Ctrl-C."""
    capture = None
    stream = None
    if args.write == "-":
        stream = _binary_stdout(out)
        if stream is None:
            raise _CliError("recv -w -: stdout is a terminal; pipe it (| tcpdump -r -) or "
                            "give a file name")
    report = sys.stderr if stream is not None else out   # stdout carries the pcap
    raw = None
    count = received = 0
    try:
        if args.write is not None and args.write != "-":
            stream = open(args.write, "wb")
            report = out
        if args.output:
            raw = open(args.output, "wb")
        if stream is not None:
            capture = _PcapWriter(stream)
        deadline = time.monotonic() + args.wait
        with _SigintFlag() as sigint:
            while (args.count is None or count < args.count) and not sigint.stopped:
                remaining = max(0.0, deadline - time.monotonic())
                frame = dev.recv(timeout=min(remaining, _SIGINT_POLL))
                if frame is None:
                    if remaining <= _SIGINT_POLL:
                        break
                    continue
                stamp = time.time()
                count += 1
                received += len(frame)
                if capture is not None:
                    capture.write(frame, stamp)
                else:
                    out.write(_tcpdump_line(frame, stamp) + "\n")
                    if args.hexdump:
                        out.write("\n".join(_tcpdump_hex(frame)) + "\n")
                if raw is not None:
                    raw.write(frame)
    except KeyboardInterrupt:
        pass   # Ctrl-C before the flag was set up ends a capture too, as it does tcpdump's
    except Exception as exc:
        # The frames written before the failure are whole: say how many.
        _note_transfer(exc, "recv stopped after %d frame(s), %d bytes%s" % (
            count, received, "".join(" written to %s" % name for name in (args.write, args.output)
                                     if name is not None)))
        raise
    finally:
        if raw is not None:
            raw.close()
        if stream is not None and args.write != "-":
            stream.close()
    report.write("%d frame(s) received\n" % count)
    return 0


class _PingStats:
    """What ping counts, and its summary in ping's own words (iputils)."""

    def __init__(self):
        self.transmitted = 0
        self.received = 0
        self.corrupted = 0
        self.duplicates = 0
        self.rtts = []
        self.start = time.monotonic()

    def summary(self, name):
        lost = self.transmitted - self.received
        loss = 100.0 * lost / self.transmitted if self.transmitted else 0.0
        extra = "".join(", +%d %s" % (n, what) for n, what in (
            (self.duplicates, "duplicates"), (self.corrupted, "corrupted")) if n)
        lines = ["", "--- %s ping statistics ---" % name,
                 "%d packets transmitted, %d received%s, %s%% packet loss, time %dms"
                 % (self.transmitted, self.received, extra, "%g" % round(loss, 4),
                    (time.monotonic() - self.start) * 1000)]
        if self.rtts:
            ms = [r * 1000 for r in self.rtts]
            mean = sum(ms) / len(ms)
            mdev = max(0.0, sum(x * x for x in ms) / len(ms) - mean * mean) ** 0.5
            lines.append("rtt min/avg/max/mdev = %.3f/%.3f/%.3f/%.3f ms"
                         % (min(ms), mean, max(ms), mdev))
        return lines

    @property
    def failed(self):
        return self.received < self.transmitted or self.corrupted > 0


def _net_ping(dev, args, out):
    """Send frames at ``-i`` intervals; each must come back byte-identical within ``-W``.

    Prints ping's per-frame lines and its summary, at the count, on Ctrl-C and
    when the back-end dies (then the error follows); status 1 when a frame was
    lost or came back changed.
    """
    size = _ETH_HLEN + args.size
    make = _frame_source(dev, args, size)
    fixed = args.payload_file is not None or args.payload_hex is not None
    clock = time.perf_counter
    first = make(1)
    largest = 0xFFFF - dev._hdr_len       # what one descriptor of send() carries
    if len(first) > largest:
        # Before the PING line, as ping checks -s before it sends anything.
        raise _UsageError("-s %d: out of range: the frame would have %d bytes, at most %d fit "
                          "(-s %d)" % (len(first) - _ETH_HLEN, len(first), largest,
                                       largest - _ETH_HLEN))
    interval = 0.0 if args.flood else args.interval
    wait = args.timeout if args.wait is None else args.wait
    out.write("PING %s %d(%d) bytes of data, %s > %s.\n"
              % (args.socket, len(first) - _ETH_HLEN, len(first), _format_mac(first[6:12]),
                 _format_mac(first[:6])))
    out.flush()
    stats = _PingStats()
    sent_at = {}    # seq -> (send time, frame), until it comes back
    done = set()    # recent seqs that came back (a second copy is a duplicate)
    verbose = not args.quiet and not args.flood

    def take(back):
        """Account one arrived frame; the seq it answers, or None."""
        now = clock()
        if fixed:   # every frame is the same: it answers the oldest one awaited
            seq = min(sent_at) if back == first and sent_at else None
        elif len(back) >= _TEST_FRAME_HEADER.size and back[:_ETH_HLEN] == first[:_ETH_HLEN]:
            seq = _TEST_FRAME_HEADER.unpack_from(back)[3]
        else:
            return None   # foreign traffic: ping ignores it too
        if seq in done:
            stats.duplicates += 1
            return None
        if seq not in sent_at:
            return None
        t0, frame = sent_at[seq]
        if back != frame:
            stats.corrupted += 1
            if verbose:
                out.write("%d bytes from %s: seq=%d (changed on the way back)\n"
                          % (len(back), args.socket, seq))
            return None
        del sent_at[seq]
        done.add(seq)
        stats.received += 1
        stats.rtts.append(now - t0)
        if verbose:
            out.write("%d bytes from %s: seq=%d time=%.3f ms\n"
                      % (len(back), args.socket, seq, (now - t0) * 1000))
        elif args.flood and not args.quiet:
            out.write("\b \b")
        return seq

    seq = 0
    try:
        # Ctrl-C sets a flag that the loop checks between calls (as recv's
        # capture does): a KeyboardInterrupt inside send() or recv() could
        # leave the device's lock taken, and closing it then hung.
        with _SigintFlag() as sigint:
            while (args.count is None or seq < args.count) and not sigint.stopped:
                seq += 1
                done.discard(seq - 4096)   # bounded, for a ping that runs for days
                frame = make(seq)
                t0 = clock()
                sent_at[seq] = (t0, frame)
                dev.send(frame)
                stats.transmitted += 1
                if args.flood and not args.quiet:
                    out.write(".")
                deadline = t0 + wait
                while seq in sent_at and not sigint.stopped:
                    left = deadline - clock()
                    back = dev.recv(timeout=min(max(0.0, left), _SIGINT_POLL))
                    if back is not None:
                        take(back)
                    elif left <= _SIGINT_POLL:
                        sent_at.pop(seq)   # lost: a late copy is not counted
                out.flush()
                if args.count is not None and seq >= args.count:
                    break
                while not sigint.stopped:
                    pause = t0 + interval - clock()
                    if pause <= 0:
                        break
                    time.sleep(min(pause, _SIGINT_POLL))
    except KeyboardInterrupt:
        pass   # Ctrl-C before the flag was set up
    except VhostUserError:
        out.write("\n".join(stats.summary(args.socket)) + "\n")
        raise   # the back-end died: the summary, then the error line
    out.write("\n".join(stats.summary(args.socket)) + "\n")
    return _EXIT_FAILURE if stats.failed else 0


_NET_ACTIONS = {"send": _net_send, "recv": _net_recv, "ping": _net_ping}
# -- fs -----------------------------------------------------------------------

def _cmd_fs(args, out):
    with _open_device(args, FsDevice, DeviceType.FS) as fs:
        if args.action == "shell":
            return _fs_shell(fs, args, out)
        try:
            return _FS_ACTIONS[args.action](fs, args, out)
        except OSError as exc:
            if _stdout_gone(exc):
                raise      # the reader left: silent, status 141 (see _main)
            raise _CliError(_fs_error_text(args.action, exc))


def _fs_error_text(action, exc):
    """``ls: dir/x: No such file or directory``: the command, the path, the reason
    (an empty path shown as ''), and what a transfer did before it failed."""
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    where = " -> ".join(os.fsdecode(n) or "''" for n in names)
    return "%s: %s%s%s" % (action, where + ": " if where else "", exc.strerror or exc,
                           _transfer_suffix(exc))


def _fs_time(seconds):
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def _fs_columns(names, out):
    """``ls``'s layout: columns across a terminal, one name a line for a pipe."""
    if not names:
        return
    if not (hasattr(out, "isatty") and out.isatty()):
        out.write("".join(name + "\n" for name in names))
        return
    import shutil
    width = shutil.get_terminal_size().columns
    cell = max(len(name) for name in names) + 2
    per_row = max(1, width // cell)
    rows = -(-len(names) // per_row)
    for row in range(rows):
        line = [names[i].ljust(cell) for i in range(row, len(names), rows)]
        out.write("".join(line).rstrip() + "\n")


def _fs_long(fs, path, name, st):
    import stat as stat_module
    line = "%s %3d %5d %5d %10d %s %s" % (stat_module.filemode(st.st_mode), st.st_nlink,
                                          st.st_uid, st.st_gid, st.st_size,
                                          _fs_time(st.st_mtime), name)
    if stat_module.S_ISLNK(st.st_mode):
        line += " -> " + fs.readlink(path)
    return line


def _fs_ls(fs, args, out):
    """ls's order: the files named first, then each directory's listing (headed when many)."""
    paths = args.paths or [""]
    kinds = [fs.lstat(path).st_mode & 0o170000 == 0o040000 for path in paths]   # all or nothing
    files = [(path, path) for path, is_dir in zip(paths, kinds) if not is_dir]
    groups = [(None, files)] if files else []
    for path, is_dir in zip(paths, kinds):
        if is_dir:
            names = fs.listdir(path)
            if args.all:
                names += [".", ".."]
            names = sorted(n for n in names if args.all or not n.startswith("."))
            groups.append((path, [(n, _fs_join(path, n)) for n in names]))
    for index, (header, entries) in enumerate(groups):
        if header is not None and len(paths) > 1:
            out.write("%s%s:\n" % ("\n" if index else "", header))
        if not args.long:
            _fs_columns([name for name, _ in entries], out)
            continue
        for name, full in entries:
            out.write(_fs_long(fs, full, name, fs.lstat(full)) + "\n")
    return 0


def _fs_tree(fs, args, out):
    top = args.path
    counts = [0, 0]

    def show(path, prefix):
        entries = sorted(fs.scandir(path), key=lambda e: e.name)
        for i, entry in enumerate(entries):
            last = i == len(entries) - 1
            name = entry.name
            if entry.is_symlink():
                name += " -> " + fs.readlink(entry.path)
            out.write("%s%s%s\n" % (prefix, "└── " if last else "├── ", name))
            if entry.is_dir(follow_symlinks=False):
                counts[0] += 1
                show(entry.path, prefix + ("    " if last else "│   "))
            else:
                counts[1] += 1

    if fs.stat(top).st_mode & 0o170000 != 0o040000:
        raise _fs_error(errno.ENOTDIR, top)
    out.write((top or "/") + "\n")
    show(top, "")
    out.write("\n%d director%s, %d file%s\n" % (counts[0], "y" if counts[0] == 1 else "ies",
                                                 counts[1], "" if counts[1] == 1 else "s"))
    return 0


_FS_KINDS = ((0o040000, "directory"), (0o100000, "regular file"), (0o120000, "symbolic link"),
             (0o010000, "fifo"), (0o140000, "socket"), (0o020000, "character special file"),
             (0o060000, "block special file"))


def _fs_stat(fs, args, out):
    import stat as stat_module
    st = fs.lstat(args.path)
    kind = dict(_FS_KINDS).get(st.st_mode & 0o170000, "unknown")
    name = args.path or "/"
    if stat_module.S_ISLNK(st.st_mode):
        name += " -> " + fs.readlink(args.path)
    stamp = lambda ns: "%s.%09d" % (  # noqa: E731
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns // 10**9)), ns % 10**9)
    out.write("  File: %s\n" % name)
    out.write("  Size: %-15d Blocks: %-10d IO Block: %-6d %s\n"
              % (st.st_size, st.st_blocks, st.st_blksize, kind))
    out.write(" Inode: %-15d Links: %d\n" % (st.st_ino, st.st_nlink))
    out.write("Access: (%04o/%s)  Uid: %d  Gid: %d\n"
              % (st.st_mode & 0o7777, stat_module.filemode(st.st_mode), st.st_uid, st.st_gid))
    out.write("Access: %s\nModify: %s\nChange: %s\n"
              % (stamp(st.st_atime_ns), stamp(st.st_mtime_ns), stamp(st.st_ctime_ns)))
    return 0


def _fs_copy_out(source, write, what, total=None):
    """Copy ``source`` to ``write`` in 1 MiB steps; a failure notes the bytes done."""
    done = 0
    with _TransferProgress(total, what=what) as progress:
        while True:
            chunk = source.read(1 << 20)
            if not chunk:
                return
            write(chunk)
            done += len(chunk)
            progress.update(done)


def _fs_each(args, paths, do):
    """Run ``do(path)`` for each path; an error is reported and the rest still run (GNU).

    ``cat a b c`` with ``b`` missing prints a and c and says why b failed on
    stderr (through ``args.report_error`` in the shell); the status is 1
    when any path failed.
    """
    report = getattr(args, "report_error", None)
    status = 0
    for path in paths:
        try:
            do(path)
        except OSError as exc:
            if _stdout_gone(exc):
                raise
            text = _fs_error_text(args.action, exc)
            if report is not None:
                report(text)
            else:
                sys.stderr.write("%s: error: %s\n" % (_PROG, text))
            status = _EXIT_FAILURE
    return status


def _fs_cat(fs, args, out):
    binary = getattr(out, "buffer", None)

    def cat(path):
        with fs.open(path, "rb") as f:
            if binary is not None:
                out.flush()
                _fs_copy_out(f, binary.write, "cat")
                binary.flush()
            else:
                _fs_copy_out(f, lambda chunk: out.write(chunk.decode("utf-8", "replace")), "cat")
    return _fs_each(args, args.paths, cat)


def _fs_get(fs, args, out):
    local = args.local or os.path.basename(args.remote.rstrip("/")) or "root"
    if os.path.isdir(local):
        local = os.path.join(local, os.path.basename(args.remote.rstrip("/")))
    with fs.open(args.remote, "rb") as source, open(local, "wb") as target:
        _fs_copy_out(source, target.write, "get", fs.stat(args.remote).st_size)
        size = target.tell()
    out.write("%s -> %s (%d bytes)\n" % (args.remote, local, size))
    return 0


def _fs_put(fs, args, out):
    remote = args.remote
    if fs._is_dir(remote):
        remote = _fs_join(remote, os.path.basename(args.local))
    with open(args.local, "rb") as source, fs.open(remote, "wb") as target:
        _fs_copy_out(source, target.write, "put", os.fstat(source.fileno()).st_size)
        size = target.tell()
    out.write("%s -> %s (%d bytes)\n" % (args.local, remote, size))
    return 0


def _fs_mkdir(fs, args, out):
    if args.parents:
        return _fs_each(args, args.paths, lambda path: fs.makedirs(path, exist_ok=True))
    return _fs_each(args, args.paths, fs.mkdir)


def _fs_rm(fs, args, out):
    import posixpath

    def rm(path):
        # GNU rm refuses '/', '.' and '..' (--preserve-root); here the root is the whole share.
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if posixpath.normpath("/" + path.lstrip("/")) == "/" or name in (".", ".."):
            raise OSError(errno.EPERM, "refusing to remove %s" % (
                "the share's root" if name not in (".", "..") else "'.' or '..'"), path)
        if args.recursive and fs.lstat(path).st_mode & 0o170000 == 0o040000:
            for dirpath, dirs, files in fs.walk(path, topdown=False):
                for name in files:
                    fs.remove(_fs_join(dirpath, name))
                for name in dirs:
                    child = _fs_join(dirpath, name)
                    if fs._is_link(child):
                        fs.remove(child)
                    else:
                        fs.rmdir(child)
            fs.rmdir(path)
        else:
            fs.remove(path)
    return _fs_each(args, args.paths, rm)


def _fs_mv(fs, args, out):
    target = args.dst
    if fs._is_dir(target):
        target = _fs_join(target, args.src.rstrip("/").rsplit("/", 1)[-1])
    fs.rename(args.src, target)
    return 0


def _fs_ln(fs, args, out):
    if args.symbolic:
        fs.symlink(args.target, args.path)
    else:
        fs.link(args.target, args.path)
    return 0


def _fs_df(fs, args, out):
    st = fs.statvfs()
    size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    percent = 100.0 * used / (used + free) if used + free else 0.0
    out.write("%-10s %12s %12s %12s %5s %12s %12s\n"
              % ("", "size", "used", "available", "use%", "inodes", "inodes free"))
    out.write("%-10s %12s %12s %12s %4.0f%% %12d %12d\n"
              % ("share", _format_bytes(size), _format_bytes(used), _format_bytes(free), percent,
                 st.f_files, st.f_ffree))
    return 0


_FS_ACTIONS = {"ls": _fs_ls, "tree": _fs_tree, "stat": _fs_stat, "cat": _fs_cat, "get": _fs_get,
               "put": _fs_put, "mkdir": _fs_mkdir, "rm": _fs_rm, "mv": _fs_mv, "ln": _fs_ln,
               "df": _fs_df}


def _fs_shell(fs, args, out):
    """An sftp-like prompt on one connection (C virtiofsd serves only one)."""
    import argparse
    import cmd
    import posixpath
    import shlex
    stdin = getattr(args, "stdin", None) or sys.stdin
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    # prog "fs": argparse starts its lines with it ("fs ls: error: ..."); "" left ": error:".
    parser = argparse.ArgumentParser(prog="fs", add_help=False)
    _add_commands(parser, ("action", "COMMAND", _FS_COMMANDS), {}, required=False)
    failures = [0]

    class Shell(cmd.Cmd):
        intro = ("Connected to %s (FUSE %d.%d). Commands: %s, cd, pwd, help, exit."
                 % (args.socket, fs.major, fs.minor, ", ".join(sorted(_FS_ACTIONS)))
                 if interactive else None)
        cwd = "/"

        def __init__(self):
            cmd.Cmd.__init__(self, stdin=stdin, stdout=out)
            self.use_rawinput = interactive and stdin is sys.stdin
            self.prompt = self._prompt()

        def _prompt(self):
            return "fs:%s> " % self.cwd if interactive else ""

        def _path(self, path):
            return posixpath.normpath(posixpath.join(self.cwd, path)) if path else self.cwd

        def emptyline(self):
            return False

        def _fail(self, text):
            failures[0] += 1
            sys.stderr.write("error: %s\n" % text)

        def onecmd(self, line):
            try:
                words = shlex.split(line, comments=True)
            except ValueError as exc:
                self._fail(str(exc))
                return False
            if not words:
                return False
            name, rest = words[0], words[1:]
            if name in ("exit", "quit", "bye", "EOF"):
                return True
            if name == "help" or name == "?":
                parser.print_help(out)
                out.write("  cd PATH, pwd, exit\n")
                return False
            if name == "pwd":
                out.write(self.cwd + "\n")
                return False
            if name == "cd":
                target = self._path(rest[0] if rest else "/")
                if not fs._is_dir(target):
                    self._fail("cd: %s: %s" % (target, "No such directory"))
                else:
                    self.cwd = target
                    self.prompt = self._prompt()
                return False
            try:
                parsed = parser.parse_args(words)
            except SystemExit:      # argparse already said what is wrong
                failures[0] += 1
                return False
            remote = {"ls": "paths", "tree": "path", "stat": "path", "cat": "paths",
                      "get": "remote", "put": "remote", "mkdir": "paths", "rm": "paths",
                      "mv": ("src", "dst"), "ln": ("path",)}.get(parsed.action, ())
            for field in (remote,) if isinstance(remote, str) else remote:
                value = getattr(parsed, field)
                if isinstance(value, list):
                    setattr(parsed, field, [self._path(v) for v in value] or [self.cwd])
                else:
                    setattr(parsed, field, self._path(value))
            if parsed.action == "ln" and not parsed.symbolic:
                parsed.target = self._path(parsed.target)   # a symlink's target stays as typed
            parsed.report_error = self._fail    # cat/rm/mkdir go on past a bad path
            try:
                _FS_ACTIONS[parsed.action](fs, parsed, out)
            except OSError as exc:
                if _stdout_gone(exc):
                    raise
                self._fail(_fs_error_text(parsed.action, exc))
            except (VhostUserError, ValueError) as exc:
                raise _CliError("%s: %s" % (parsed.action, _one_line(exc)))
            return False

    shell = Shell()
    while True:
        try:
            shell.cmdloop()
            break
        except KeyboardInterrupt:     # ^C drops the line being typed, as sftp does
            if not interactive:
                raise
            out.write("^C\n")
            shell.intro = None
    if interactive:
        out.write("\n")
    return 0 if interactive or not failures[0] else _EXIT_FAILURE
############################################################################
# Command line #############################################################
############################################################################

# -- migrate --------------------------------------------------------------------

#: Chunk of one rehearsal read or write, and how many run at once.
_MIGRATE_CHUNK = 64 << 10
_MIGRATE_DEPTH = 16
#: Requests (frames) posted without a kick just before the move: in flight, never taken by OLD.
_MIGRATE_UNTAKEN = 8
#: Seconds OLD is left idle before those are posted: a back-end still handling an earlier kick
#: (libvhost-user pops until its avail ring is empty) would take them without one.
_MIGRATE_SETTLE = 0.1


def _device_spans(dev):
    """(gpa, length) of everything a back-end writes in the device's rings: used parts (split:
    the used ring; packed: the descriptor ring, where the device writes descriptors back)."""
    return [(q.desc_table, 16 * q.size) if q.packed else (q.used_ring, 6 + 8 * q.size)
            for q in dev._queues]


def _logged_run(dev, log, spans, run):
    """``run()`` with guest memory at ``spans`` copied, rings stopped, before and after it.

    Returns (run's result, pages the back-end changed there, those the log lacks).
    """
    frontend, mem = dev.frontend, dev.memory
    frontend.virtio_sleep()
    before = [mem.read(gpa, length) for gpa, length in spans]
    log.clear()
    frontend.virtio_wake()
    result = run()
    frontend.virtio_sleep()
    after = [mem.read(gpa, length) for gpa, length in spans]
    frontend.virtio_wake()
    written = set()
    for (gpa, length), old, new in zip(spans, before, after):
        at = gpa
        while at < gpa + length:
            end = min(gpa + length, (at // _LOG_PAGE + 1) * _LOG_PAGE)
            if old[at - gpa:end - gpa] != new[at - gpa:end - gpa]:
                written.add(at // _LOG_PAGE)
            at = end
    return result, written, sorted(written - set(log.pages()))


def _migrate_log(dev, out, spans, run):
    """Phase 1 with the dirty log, when OLD offers it; the result of ``run()``."""
    try:
        log = dev.start_dirty_log()
    except FeatureNotNegotiated as exc:
        out.write("dirty log: not offered by OLD (%s); I/O runs without it\n" % _one_line(exc))
        return run()
    try:
        result, written, missing = _logged_run(dev, log, spans, run)
    finally:
        log.stop()
    if missing:
        raise _CliError("dirty log: OLD wrote %d page(s) it did not log: %s"
                        % (len(missing), " ".join(str(p) for p in missing[:20])))
    out.write("dirty log: %d pages; the back-end wrote %d of them, all logged\n"
              % (log.page_count, len(written)))
    return result


def _migrate_move(dev, args, out):
    started = time.monotonic()
    try:
        dev.move_to(args.new)
    except VhostUserError as exc:
        raise _CliError("%s: the move failed, the device stayed on %s: %s"
                        % (args.new, args.socket, _one_line(exc)))
    out.write("moved: %s -> %s in %.3f s; %d chain(s) in flight offered again to NEW\n"
              % (args.socket, args.new, time.monotonic() - started,
                 dev.frontend.moved_in_flight))


def _migrate_blk(dev, args, out):
    length = min(args.length, dev.capacity - args.offset)
    if args.offset % dev.block_size or length < dev.block_size or args.offset < 0:
        raise _UsageError("--offset %d --length %d: a block-aligned range inside the %d-byte "
                          "disk" % (args.offset, args.length, dev.capacity))
    length -= length % dev.block_size
    chunk = min(_MIGRATE_CHUNK, length)
    starts = list(range(args.offset, args.offset + length - chunk + 1, chunk))
    buffers = [dev.alloc(chunk) for _ in range(min(_MIGRATE_DEPTH, len(starts)))]

    def pattern(start):
        return struct.pack("<QQ", start, 0x6D696772617465) * (chunk // 16)   # "migrate"

    def run(write):
        data = {}
        for i in range(0, len(starts), len(buffers)):
            batch = starts[i:i + len(buffers)]
            views = buffers[:len(batch)]
            if write:
                for start, view in zip(batch, views):
                    view[:] = pattern(start)
                dev.post_writes(batch, views)
            else:
                dev.post_reads(batch, views)
            done = []
            while len(done) < len(batch):
                done += dev.reap(count=len(batch) - len(done))
            if not write:
                for start, view in zip(batch, views):
                    data[start] = bytes(view)
        return data

    if args.write:
        run(True)
    for view in buffers:   # so that the reads change what they land in
        view[:] = b"\xa5" * chunk
    spans = _device_spans(dev) + [(dev._buffers[id(b)][1], chunk) for b in buffers]
    before = _migrate_log(dev, out, spans, lambda: run(False))
    out.write("OLD: %d read(s) of %d bytes%s\n" % (len(starts), chunk,
                                                  ", after writing them" if args.write else ""))
    untaken = starts[:_MIGRATE_UNTAKEN]
    time.sleep(_MIGRATE_SETTLE)
    requests = [dev.submit_write(start, pattern(start), notify=False) if args.write
                else dev.submit_read(start, chunk, notify=False) for start in untaken]
    _migrate_move(dev, args, out)
    done = []
    while len(done) < len(requests):
        done += dev.complete(count=len(requests) - len(done))
    failed = 0
    for start, request in zip(untaken, requests):
        try:
            result = request.result()
        except VhostUserError:
            failed += 1
            continue
        if not args.write and bytes(result) != before[start]:
            raise _CliError("%s: the read at %d in flight at the move returned other data than "
                            "OLD had" % (args.new, start))
    after = run(False)
    differ = [start for start in starts if after[start] != before[start]]
    wrong = [start for start in starts if args.write and after[start] != pattern(start)]
    if failed or differ or wrong:
        raise _CliError("%s: after the move %d request(s) failed, %d chunk(s) read differently "
                        "from OLD%s" % (args.new, failed, len(differ), ", %d chunk(s) lost "
                                        "their write" % len(wrong) if args.write else ""))
    out.write("NEW: %d request(s) in flight at the move completed, %d read(s) match OLD%s\n"
              % (len(requests), len(starts),
                 ", every write kept" if args.write else ""))
    return 0


def _migrate_net(dev, args, out):
    pair = dev._pairs[0]
    spans = _device_spans(dev) + [(pair.rx_pool, pair.rx.size * dev._rx_size)]
    size, seq = 64, [0]

    def pump(count):
        back = set()
        for start in range(seq[0], seq[0] + count, 32):
            burst = range(start, min(seq[0] + count, start + 32))
            dev.send_many([_test_frame(_TEST_MAC, i, size) for i in burst])
            for _ in burst:
                frame = dev.recv(args.timeout)
                if frame is None:
                    break
                back.add(_TEST_FRAME_HEADER.unpack_from(frame)[3])
        sent = set(range(seq[0], seq[0] + count))
        seq[0] += count
        return sent, back

    sent, back = _migrate_log(dev, out, spans, lambda: pump(args.count))
    out.write("OLD: %d of %d frame(s) came back\n" % (len(back & sent), len(sent)))
    if back & sent != sent:
        raise _CliError("%s: %d frame(s) did not come back before the move (is it an echo, "
                        "e.g. testpmd --forward-mode=io?)" % (args.socket, len(sent - back)))
    _migrate_move(dev, args, out)
    sent, back = pump(args.count)
    if back & sent != sent:
        raise _CliError("%s: %d of %d frame(s) sent after the move did not come back"
                        % (args.new, len(sent - back), len(sent)))
    out.write("NEW: %d of %d frame(s) sent after the move came back\n"
              % (len(back & sent), len(sent)))
    return 0


def _cmd_migrate(args, out):
    _check_socket(args.new)
    if args.type:
        kind = _CLI_TYPES[args.type]
    else:
        with _cli_connect(args.socket, args.timeout) as client:
            features = client.get_features()
            protocol = client.get_protocol_features() \
                if features & VirtioFeature.PROTOCOL_FEATURES else None
        kind = _guess_device_type(features, protocol)[0]
    if kind not in (DeviceType.BLOCK, DeviceType.NET):
        raise _UsageError("migrate: blk and net devices only (OLD looks like %s; use --type)"
                          % (kind.name.lower() if kind is not None else "nothing known"))
    if kind == DeviceType.NET and args.write:
        raise _UsageError("--write applies to blk devices only")
    cls = BlockDevice if kind == DeviceType.BLOCK else NetDevice
    with _open_device(args, cls, kind) as dev:
        out.write("migrate: %s %s -> %s\n" % (_DEVICE_LABELS[kind], args.socket, args.new))
        status = (_migrate_blk if kind == DeviceType.BLOCK else _migrate_net)(dev, args, out)
    out.write("ok\n")
    return status
# -- demo ---------------------------------------------------------------------

#: Debian package that ships qemu-storage-daemon (README "Quick start").
_DEMO_PACKAGE = "qemu-system-common"


def _listening(path):
    """True when a unix socket bound at ``path`` listens (/proc/net/unix; True if unreadable)."""
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return True
    for line in lines:
        # Num RefCount Protocol Flags Type St Inode Path; Flags 0x10000 is __SO_ACCEPTCON.
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
            return True
    return False


def _terminate_with_parent():
    """A ``preexec_fn``: the child gets SIGTERM when the thread that started it dies.

    prctl(PR_SET_PDEATHSIG) covers what no signal handler can: this process
    killed by SIGKILL would otherwise leave the daemon (in its own session)
    running. libc is loaded before the fork: no dlopen in the child.
    """
    import signal
    prctl = _libc().prctl
    parent = os.getpid()

    def preexec():
        prctl(1, int(signal.SIGTERM), 0, 0, 0)   # 1 is PR_SET_PDEATHSIG (prctl(2))
        if os.getppid() != parent:               # the parent died before prctl()
            os._exit(1)
    return preexec


class _DemoDaemon:
    """The demo's back-end on a temporary raw file; stop() removes everything.

    qemu-storage-daemon when ``binary`` names it, else the embedded back-end
    in a child process.
    """

    def __init__(self, size, binary=None):
        import subprocess
        import tempfile
        self.name = "qemu-storage-daemon" if binary else "the embedded back-end"
        self.tmpdir = tempfile.mkdtemp(prefix="vhost-user-demo-")
        self.proc = None
        try:
            self.disk = os.path.join(self.tmpdir, "disk.raw")
            self.socket = os.path.join(self.tmpdir, "blk.sock")
            with open(self.disk, "wb") as f:
                f.truncate(size)
            self.log = os.path.join(self.tmpdir, "backend.log")
            if binary is None:
                self.proc = _spawn_embedded("blk", self.socket, disk=self.disk,
                                            log_path=self.log)
            else:
                with open(self.log, "wb") as log:
                    self.proc = subprocess.Popen(
                        [binary, "--blockdev", "driver=file,node-name=disk0,filename=%s,"
                         "aio=threads,cache.direct=off" % self.disk,
                         "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,"
                         "addr.type=unix,addr.path=%s,writable=on,num-queues=1" % self.socket],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True, close_fds=True,
                        preexec_fn=_terminate_with_parent())
            self._wait_for_socket(10.0)
        except BaseException:
            self.stop()
            raise

    def _wait_for_socket(self, timeout):
        import stat
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise _CliError("%s exited with status %d: %s"
                                % (self.name, self.proc.returncode, self._log_tail()))
            try:
                # The file appears at bind(), connections are refused until
                # listen(): wait for both, or the probe can be refused.
                if stat.S_ISSOCK(os.stat(self.socket).st_mode) and _listening(self.socket):
                    return
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise _CliError("%s did not listen on %s within %.0f s"
                                % (self.name, self.socket, timeout))
            time.sleep(0.01)

    def _log_tail(self):
        try:
            with open(self.log, "rb") as f:
                lines = f.read().decode("utf-8", "replace").strip().splitlines()
        except OSError:
            lines = []
        return lines[-1] if lines else "(no output)"

    def stop(self):
        """SIGTERM (SIGKILL after 10 s) and remove the temporary files; safe to call twice."""
        import shutil
        import signal
        import subprocess
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind, cleaning up on the way, as Ctrl-C does."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class _TerminationUnwinds:
    """While active, SIGTERM and SIGHUP raise ``_Terminated`` in the main thread.

    A daemon and its files would otherwise be left behind by ``kill`` or a
    closed terminal, which end a process without running ``finally``. The
    first signal unwinds; a second one, while cleaning up, ends the process
    at once (their default action), as a second Ctrl-C would.
    """

    def __enter__(self):
        import signal
        self._saved = {}
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            for signum in (signal.SIGTERM, signal.SIGHUP):
                self._saved[signum] = signal.signal(signum, self._unwind)
        return self

    def _unwind(self, signum, frame):
        import signal
        for other in self._saved:
            signal.signal(other, signal.SIG_DFL)
        raise _Terminated(signum)

    def __exit__(self, *exc):
        import signal
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)


def _cli_command():
    """How to run this file from here, for commands a user can paste."""
    import shlex
    path = os.path.abspath(__file__)
    relative = os.path.relpath(path)
    return "python3 " + shlex.quote(relative if not relative.startswith("..") else path)


def _cmd_demo(args, out):
    import shutil
    binary = None if args.embedded else shutil.which("qemu-storage-daemon")
    with _TerminationUnwinds():
        daemon = _DemoDaemon(64 << 20, binary)
        try:
            _demo_tour(args, out, daemon)
        finally:
            tmpdir = daemon.tmpdir
            daemon.stop()
    out.write("5. Stopped %s and removed %s\n" % (daemon.name, tmpdir))
    return 0


def _demo_tour(args, out, daemon):
    import io
    import shlex
    parser = _build_parser()[0]
    command = _cli_command()

    def step(*argv):
        """Echo the command as a user would type it, run it the same way, indent its output."""
        argv = [str(a) for a in argv]
        out.write("   $ %s %s\n" % (command, " ".join(shlex.quote(a) for a in argv)))
        step_args = parser.parse_args(argv)
        step_args.timeout, step_args.verbose = args.timeout, False
        text = io.StringIO()
        step_args.func(step_args, text)
        out.write("".join("   %s\n" % line for line in text.getvalue().splitlines()))

    sock = daemon.socket
    if daemon.name == "qemu-storage-daemon":
        out.write("1. Started qemu-storage-daemon (pid %d) exporting a 64 MiB raw file\n"
                  "   as vhost-user-blk on %s\n\n" % (daemon.proc.pid, sock))
    else:
        why = ("--embedded asks for it" if args.embedded else
               "qemu-storage-daemon is not installed; for the real one on Debian or Ubuntu:\n"
               "   sudo apt-get install %s" % _DEMO_PACKAGE)
        out.write("1. Started the embedded back-end (pid %d), a small vhost-user-blk back-end\n"
                  "   inside this module, exporting a 64 MiB raw file on %s\n"
                  "   (%s)\n\n" % (daemon.proc.pid, sock, why))
    out.write("2. What the back-end offers:\n")
    step("probe", sock)
    offset, data = 1 << 20, os.urandom(64 << 10)
    source = os.path.join(daemon.tmpdir, "data.bin")
    with open(source, "wb") as f:
        f.write(data)
    out.write("\n3. 64 KiB of random data written at offset 1 MiB, flushed, compared:\n")
    step("blk", sock, "write", "1M", "-i", source)
    step("blk", sock, "flush")
    step("blk", sock, "verify", "1M", "64k", "--file", source)
    with open(daemon.disk, "rb") as f:
        f.seek(offset)
        if f.read(len(data)) != data:
            raise _CliError("the raw file does not hold the data written")
    out.write("   identical, and the raw file holds the same bytes.\n\n")
    out.write("4. A %g-second benchmark:\n" % args.seconds)
    step("bench", sock, "--rw", "randread", "--seconds", "%g" % args.seconds,
         "--backend-pid", daemon.proc.pid)
    out.write("\n")
# -- selftest -----------------------------------------------------------------

def _check_memfd():
    fd = _memfd_create("vhost-user-selftest", _PAGE_SIZE)
    try:
        if _file_seals(fd) & _F_SEAL_SHRINK != _F_SEAL_SHRINK:
            raise _CliError("the memfd is not sealed against shrinking")
        try:
            os.ftruncate(fd, 0)
        except PermissionError:
            return "created, sealed; a shrinking ftruncate is refused (EPERM)"
        raise _CliError("F_SEAL_SHRINK did not stop ftruncate from shrinking the memfd")
    finally:
        os.close(fd)


def _check_eventfd():
    with Event() as event:
        event.signal()
        event.signal()
        if event.read() != 2 or event.wait(0) != 0:
            raise _CliError("the counter does not add up")
        timer = threading.Timer(0.02, event.signal)
        timer.start()
        try:
            if event.wait(5.0) != 1:
                raise _CliError("a signal from another thread did not wake the waiter")
        finally:
            timer.join()
    return "counts, and wakes a waiter in another thread"


def _check_scm_rights():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender, receiver = _Channel(ours, 5.0), _Channel(theirs, 5.0)
    fd = _memfd_create("vhost-user-selftest", _PAGE_SIZE)
    fds = []
    try:
        sender.send(FrontendReq.SET_MEM_TABLE, _VERSION, b"x", [fd])
        _, _, size, fds = receiver.recv_header("selftest")
        receiver.recv_body(size, "selftest")
        if len(fds) != 1 or os.fstat(fds[0])[1:3] != os.fstat(fd)[1:3]:
            raise _CliError("the fd did not arrive as the same file (%d fd(s))" % len(fds))
        os.pwrite(fds[0], b"ping", 0)
        if os.pread(fd, 4, 0) != b"ping":
            raise _CliError("a write through the received fd is not seen through the sent one")
    finally:
        _close_fds(fds + [fd])
        sender.close()
        receiver.close()
    return "an fd sent with a message arrives as the same file"


def _check_shared_mapping():
    with GuestMemory([(0, 1 << 16)], name="vhost-user-selftest") as mem:
        region, fd = mem.regions()[0]
        other = _MappedMemory([region], [fd])
        try:
            mapped, offset = other.locate(0x1000, 8, _GPA, "selftest")
            mem.write(0x1000, b"frontend")
            if mapped[offset:offset + 8] != b"frontend":
                raise _CliError("a write is not seen through the other mapping")
            mapped[offset:offset + 8] = b"back-end"
            if mem.read(0x1000, 8) != b"back-end":
                raise _CliError("a write through the other mapping is not seen")
        finally:
            other.close()
    return "two mappings of one memfd see each other's writes"


def _check_ring_ordering():
    count = 50000
    fd = _memfd_create("vhost-user-selftest", _PAGE_SIZE)
    mapped = mmap.mmap(fd, _PAGE_SIZE)
    view = memoryview(mapped)
    load, store, words = _ring_words(view, "H")
    proc = None
    try:
        proc = _spawn_child(["ring-writer", str(fd), str(count)], pass_fds=(fd,))
        fences = _Fences()
        consumed = 0
        last = 0
        deadline = time.monotonic() + 30
        while consumed < count:
            index = load(_PROBE_IDX)
            if index == last:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise _CliError("the writer process stopped after %d of %d entries "
                                    "(status %s)" % (consumed, count, proc.poll()))
                continue
            ahead = (index - last) & 0xFFFF
            if ahead > _PROBE_RING:
                raise _CliError("the index went from %#06x to %#06x: a torn 16-bit access"
                                % (last, index))
            fences.read()
            for i in range(consumed + 1, consumed + ahead + 1):
                value = load(_PROBE_SLOTS + i % _PROBE_RING)
                if value != _probe_value(i):
                    raise _CliError("entry %d read as %#06x before its write (%#06x) was "
                                    "visible: stores or loads reordered"
                                    % (i, value, _probe_value(i)))
            consumed += ahead
            last = index
            store(_PROBE_CONSUMED, last)
        if proc.wait(10) != 0:
            raise _CliError("the writer process exited with status %d" % proc.returncode)
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdin.close()
        words.release()
        view.release()
        mapped.close()
        os.close(fd)
    return "%d entries from another process, none torn or early" % count


def _check_block_device(timeout):
    import tempfile
    tmpdir = tempfile.mkdtemp(prefix="vhost-user-selftest-")
    path = os.path.join(tmpdir, "blk.sock")
    try:
        with _EmbeddedBackend(_EmbeddedBlock(size=8 << 20), path=path).start():
            with BlockDevice.connect(path, timeout=timeout) as dev:
                data = os.urandom(256 << 10)
                dev.write(4096, data)
                dev.flush()
                if dev.read(4096, len(data)) != data:
                    raise _CliError("the data read back differs")
                serial = dev.get_id()
                requests = [dev.submit_read(i * 4096, 4096, notify=False) for i in range(32)]
                done = []
                while len(done) < len(requests):
                    done += dev.complete()
                for request in done:
                    request.result()
    finally:
        import shutil
        shutil.rmtree(tmpdir, ignore_errors=True)
    return "8 MiB disk: 256 KiB written, flushed, read back identical; GET_ID %r; " \
        "32 reads in flight" % serial.decode("ascii", "replace")


def _check_net_device(timeout):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        backend = _EmbeddedBackend(_EmbeddedNet(), sock=theirs)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    with backend.start():
        with NetDevice.connect(ours, timeout=timeout) as nic:
            frames = [_test_frame(bytes(nic.mac), seq, 60 + 23 * seq) for seq in range(64)]
            nic.send_many(frames)
            for seq, frame in enumerate(frames):
                back = nic.recv(timeout)
                if back != frame:
                    raise _CliError("frame %d came back %s" % (
                        seq, "changed" if back is not None else "not at all"))
    return "64 frames of 60..1509 bytes echoed byte-identical, in order"


def _cmd_selftest(args, out):
    import platform
    checks = [
        ("memfd with seals", _check_memfd),
        ("eventfd", _check_eventfd),
        ("SCM_RIGHTS", _check_scm_rights),
        ("shared mappings", _check_shared_mapping),
        ("ring ordering", _check_ring_ordering),
        ("virtio-blk end to end", lambda: _check_block_device(args.timeout)),
        ("virtio-net end to end", lambda: _check_net_device(args.timeout)),
    ]
    for name, check in checks:
        start = time.monotonic()
        try:
            detail = check()
        except Exception as exc:
            out.write("FAIL  %-22s %s\n" % (name, _one_line(exc)))
            out.flush()
            raise _CliError("selftest: %s failed: %s" % (name, _one_line(exc)))
        out.write("ok    %-22s %s (%.0f ms)\n" % (name, detail, (time.monotonic() - start) * 1e3))
        out.flush()
    out.write("selftest: all %d checks passed: %s %s on %s %s\n"
              % (len(checks), platform.python_implementation(), platform.python_version(),
                 platform.system(), platform.machine()))
    return 0


# -- the parser, from a table ------------------------------------------------

#: Every command of the command line, in the order --help lists them.
_CLI_COMMANDS = (
    _command(
        "probe", "show what a back-end offers", func=_cmd_probe,
        description="Connect, ask the back-end for its features, protocol features, queue "
                    "count, memory slots, shared memory and device config, and print them. "
                    "Negotiates only the protocol features these questions need.",
        options=(
            _SOCKET,
            _opt("--type", type=_device_type_arg, metavar="TYPE",
                 help="device type for naming feature bits and decoding config (blk, net, "
                      "fs, gpu, vsock, ... or a virtio device ID; default: guessed)"),
            _JSON,
            _opt("--config-size", type=_int_arg, metavar="BYTES",
                 help="bytes of device config to read (default: from the type's layout)"))),
    _command(
        "validate", "check a back-end against the vhost-user spec", func=_cmd_validate,
        description="Run a catalogue of conformance checks (negotiation, protocol features, "
                    "rings, memory, device I/O, recovery) and report pass, fail, skip or "
                    "error for each, with the spec section it rests on. Exit status: 0 when "
                    "nothing failed, 1 on a fail or error, 2 on bad usage. Block devices "
                    "get a 4 KiB write at sector 8 (its old data is written back).",
        options=(
            _SOCKET,
            _opt("--type", type=_device_type_arg, metavar="TYPE",
                 help="device type: blk, net, fs, ... or a virtio device ID (default: guessed "
                      "from the offered features)"),
            _opt("--only", metavar="PATTERN",
                 help="run only checks whose id matches PATTERN (shell-style, "
                      "comma-separated: 'neg.*,ring.stop')"),
            _one_of(_JSON, _opt("--tap", action="store_true", help="print TAP version 13")),
            _opt("--destructive", action="store_true",
                 help="also run the checks that may crash a back-end (malformed chains, a "
                      "truncated message); they run last"))),
    _command(
        "blk", "block device I/O", func=_cmd_blk, options=(_SOCKET,),
        description="Read, write, verify, flush, discard or zero a vhost-user-blk device. "
                    "OFFSET and LENGTH take 0x prefixes and k/M/G suffixes; read, write and "
                    "verify take any alignment and stream in bounded steps, the others want "
                    "whole blocks.",
        commands=("action", "ACTION", (
            _command("info", "capacity, block size, read-only, cache, queues, serial, "
                             "topology, discard and write-zeroes limits", (_JSON,)),
            _command(
                "read", "read LENGTH bytes at OFFSET",
                description="Raw bytes go to FILE or to stdout; a terminal gets a hex dump "
                            "(hexdump -C's) instead. Unaligned ranges read the covering "
                            "blocks.",
                options=_RANGE + (_one_of(
                    _opt("-o", "--output", metavar="FILE", help="write the data to FILE"),
                    _opt("-C", "--hexdump", action="store_true",
                         help="print hexdump -C's dump even when stdout is not a terminal")),)),
            _command(
                "write", "write stdin (or FILE) at OFFSET",
                description="Streams FILE or stdin to the device in bounded steps. Data that "
                            "does not start or end on a block boundary needs --pad or --rmw.",
                options=(
                    _OFFSET,
                    _opt("-i", "--input", metavar="FILE", help="read the data from FILE"),
                    _one_of(
                        _opt("--pad", action="store_true",
                             help="zero-fill the partial first and last blocks"),
                        _opt("--rmw", action="store_true",
                             help="read the partial first and last blocks and keep their "
                                  "other bytes (read-modify-write; not atomic)")))),
            _command(
                "verify", "compare LENGTH bytes at OFFSET with a pattern or file",
                description="Read and compare (qemu-io's read -P); a mismatch prints its "
                            "offset and exits 1.",
                options=_RANGE + (_one_of(
                    _opt("--pattern", type=_byte_arg, metavar="BYTE",
                         help="every byte must be BYTE (0..255, e.g. 0xab)"),
                    _opt("--file", metavar="FILE",
                         help="the bytes must equal FILE's first LENGTH bytes"),
                    required=True),)),
            _command("flush", "flush the device's write cache"),
            _command("discard", "discard LENGTH bytes at OFFSET", _RANGE),
            _command("write-zeroes", "zero LENGTH bytes at OFFSET", _RANGE)))),
    _command(
        "net", "send, receive or loop back Ethernet frames", func=_cmd_net, options=(_SOCKET,),
        description="Quick checks of a vhost-user-net back-end. `ping` is the loopback check "
                    "for a back-end that returns what it receives, such as DPDK testpmd in io "
                    "forward mode. Frames are plain Ethernet (no virtio-net header, no "
                    "offloads); generated ones go to the broadcast address with ethertype "
                    "0x88b5 and carry a sequence number.",
        commands=("action", "ACTION", (
            _command(
                "send", "send N frames, or replay a pcap file", parents=("common", "ring"),
                description="Send N generated frames (or one given frame N times), or with -r "
                            "the frames of a pcap file (tcpreplay: --loop, --pps); waits until "
                            "the back-end has taken them.",
                options=(
                    _opt("-n", "-c", "--count", type=_count_arg, default=1, metavar="N",
                         help="frames to send (default 1)"),
                    _opt("--size", type=_int_arg, default=64, metavar="BYTES",
                         help="size of generated frames (default 64)"),
                    _opt("-r", "--read", metavar="FILE.pcap",
                         help="send the frames of this pcap file (as tcpdump -w writes it)"),
                    _opt("--loop", type=_int_arg, default=1, metavar="N",
                         help="with -r: send the file N times, 0 for ever (default 1)"),
                    _opt("--pps", type=_rate_arg, metavar="RATE",
                         help="with -r: at most RATE frames per second (default: at once)"),
                    _PAYLOAD)),
            _command(
                "ping", "send frames at intervals; each must come back byte-identical (ping's "
                        "options)", parents=("common", "ring"),
                description="Send frames one at a time, every -i seconds, and wait up to -W "
                            "seconds for each to come back byte-identical (a back-end that "
                            "returns what it receives, like testpmd in io forward mode). "
                            "Prints a line per frame and ping's summary (at the count, on "
                            "Ctrl-C and when the back-end dies); exit status 1 when a frame "
                            "was lost or came back changed.",
                options=(
                    _opt("-c", "--count", type=_count_arg, metavar="COUNT",
                         help="stop after COUNT frames (default: until Ctrl-C)"),
                    _opt("-i", "--interval", type=_SECONDS_OR_ZERO, default=1.0,
                         metavar="INTERVAL",
                         help="seconds between frames (default 1; 0 for back to back)"),
                    _opt("-s", "--size", type=_int_arg, default=50, metavar="SIZE",
                         help="data bytes after the 14-byte Ethernet header (default 50: "
                              "64-byte frames)"),
                    _opt("-W", "--wait", type=_seconds_arg, metavar="TIMEOUT",
                         help="seconds to wait for each frame (default: --timeout)"),
                    _opt("-f", "--flood", action="store_true",
                         help="flood: the next frame as soon as the last came back; prints "
                              "'.' per frame sent and erases it when it comes back"),
                    _opt("-q", "--quiet", action="store_true",
                         help="print only the first line and the summary"),
                    _PAYLOAD)),
            _command(
                "recv", "print the frames that arrive, or capture them as pcap",
                parents=("common", "ring"),
                description="One line per frame as tcpdump -e prints it (time, MACs, "
                            "ethertype, length), or with -w a pcap file tcpdump and Wireshark "
                            "read; stops after -c frames, --wait seconds or Ctrl-C.",
                options=(
                    _opt("-c", "-n", "--count", type=_count_arg, metavar="N",
                         help="stop after N frames"),
                    _opt("--wait", type=functools.partial(_seconds_arg, allow_zero=True,
                                                          allow_inf=True),
                         default=1.0, metavar="S",
                         help="stop after S seconds (default 1; inf: until -c or Ctrl-C)"),
                    _opt("-x", "--hexdump", action="store_true",
                         help="hex-dump each frame as tcpdump -xx does"),
                    _opt("-w", "--write", metavar="FILE.pcap",
                         help="write a pcap file (LINKTYPE_ETHERNET, µs timestamps); - for "
                              "stdout (| tcpdump -r -)"),
                    _opt("-o", "--output", metavar="FILE",
                         help="write the frames' bytes to FILE, one after the other")))))),
    _command(
        "bench", "measure throughput, latency and CPU per request", func=_cmd_bench,
        description="Run I/O for --seconds and report IOPS and MiB/s (blk; fs: FUSE reads or "
                    "writes of one file in the share) or packets/s and Mbit/s of frames "
                    "looped back by the back-end (net: testpmd in io forward mode), latency "
                    "percentiles, this process's CPU time per request and the back-end's: the "
                    "socket's peer (or --backend-pid) and every process under it (from "
                    "/proc/PID/stat, 10 ms resolution). A progress line is drawn on stderr "
                    "only when stderr is a terminal.",
        # fio's names and meanings where fio has the option (--bs, --iodepth, --numjobs are
        # its spellings of --size, --depth, --queues).
        options=(
            _SOCKET,
            _opt("--type", choices=("blk", "net", "fs"), default="blk",
                 help="device to drive (default blk)"),
            _BENCH_RING,
            _opt("--rw", "--readwrite", choices=sorted(_BENCH_RW), metavar="MODE",
                 help="blk access pattern, as fio's: read, write, randread, randwrite, rw (or "
                      "readwrite), randrw (default randread)"),
            _opt("--rwmixread", type=_percent_arg, metavar="PCT",
                 help="rw/randrw: percent of requests that read (default 50)"),
            _opt("--file", default="vhost-user-bench.dat", metavar="PATH",
                 help="fs: the file in the share to read or write (made with --file-size "
                      "bytes when missing, and removed after)"),
            _opt("--file-size", type=_int_arg, default=64 << 20, metavar="BYTES",
                 help="fs: size of the file made when missing (default 64M)"),
            _opt("--size", "--bs", type=_int_arg, metavar="BYTES",
                 help="bytes per request or frame (default 4096 for blk, 64 for net)"),
            _opt("--depth", "--iodepth", type=_count_arg, default=1, metavar="N",
                 help="requests in flight per queue (default 1)"),
            _opt("--queues", "--numjobs", type=_count_arg, metavar="N",
                 help="queues (blk) or queue pairs (net) to use, one thread each (default 1)"),
            _opt("--offset", type=_int_arg, default=0, metavar="BYTES",
                 help="blk: start of the region exercised (default 0)"),
            _opt("--span", type=_int_arg, metavar="BYTES",
                 help="blk: bytes of the region exercised (fio's size=; default: to the end "
                      "of the device)"),
            _opt("--seconds", "--runtime", type=_seconds_arg, default=3.0, metavar="S",
                 help="duration measured (default 3)"),
            _opt("--ramp_time", "--ramp-time", type=_SECONDS_OR_ZERO, default=0.0, metavar="S",
                 help="run S seconds first, excluded from the figures (fio's ramp_time; "
                      "PyPy's JIT compiles the path in about the first half second)"),
            _opt("--verify", action="store_true",
                 help="blk: writes carry a header (offset, sequence number, CRC32 of the "
                      "block) and reads check it; a mismatch is an error naming the offset. "
                      "Write modes read back what they wrote at the end. net: every echo "
                      "is compared byte for byte, not one round in %d" % _NET_BENCH_CHECK_EVERY),
            _opt("--histogram", action="store_true",
                 help="also print a text histogram of completion latencies"),
            _opt("--backend-pid", type=int, metavar="PID",
                 help="the back-end process whose CPU time (with its children's) is reported "
                      "(default: the socket's peer, from SO_PEERCRED)"),
            _opt("--spin", type=_SECONDS_OR_ZERO, metavar="S",
                 help="seconds to poll the used ring before sleeping (default: chosen from "
                      "where the back-end runs)"),
            _opt("--event-idx", choices=("on", "off"),
                 help="negotiate RING_EVENT_IDX (default on; off: a call per completion)"),
            _opt("--loop", choices=("device", "queue"), default="device",
                 help="device: BlockDevice's fast path (default); queue: a plain loop over "
                      "Queue, the yardstick for it"),
            _opt("--mrg-rxbuf", action="store_true",
                 help="net: negotiate MRG_RXBUF when offered (default off: bench's frames "
                      "fit one receive buffer, and DPDK's vhost PMD fills mergeable buffers "
                      "more slowly)"),
            _JSON)),
    _command(
        "fs", "list, read and write a virtio-fs share (virtiofsd)", func=_cmd_fs,
        options=(_SOCKET,),
        description="Use a virtio-fs share through its vhost-user back-end, as FUSE over the "
                    "request queue, with no VM. Paths are relative to the share's root. C "
                    "virtiofsd serves one connection and then exits, so each command consumes "
                    "one daemon; `shell` runs many commands on one connection.",
        commands=("action", "COMMAND", _FS_COMMANDS + (
            _command("shell", "an sftp-like prompt: many commands on one connection"),))),
    _command(
        "migrate", "rehearse a migration: move a running device", func=_cmd_migrate,
        parents=("common", "ring"),
        description="Rehearse what a VMM does around a migration, with no VM: connect to OLD, "
                    "run I/O with the dirty log on (when OLD offers it) and check that every "
                    "guest page OLD wrote was logged, post a few requests without a kick, move "
                    "the device to NEW (rings stopped on OLD, started on NEW at the indices OLD "
                    "returned, what was in flight offered again), then continue the I/O on NEW "
                    "and verify it: blk reads the range again and compares with what OLD read "
                    "(--write: writes a pattern first and checks it survived); net sends "
                    "numbered frames through an echoing back-end (testpmd --forward-mode=io) "
                    "and checks every one came back. OLD and NEW must serve the same disk or "
                    "network. Exit status 0 when everything verified, 1 otherwise.",
        options=(
            _opt("socket", metavar="OLD"),
            _opt("new", metavar="NEW"),
            _opt("--type", choices=("blk", "net"), help="device type (default: guessed from OLD)"),
            _opt("--offset", type=_int_arg, default=0, metavar="BYTES",
                 help="blk: start of the range (default 0)"),
            _opt("--length", type=_int_arg, default=1 << 20, metavar="BYTES",
                 help="blk: bytes of the range (default 1M)"),
            _opt("--write", action="store_true",
                 help="blk: write a pattern over the range (destroys its data)"),
            _opt("-n", "--count", type=_count_arg, default=1000, metavar="N",
                 help="net: frames before and after the move (default 1000)"))),
    _command(
        "demo", "try it: a temporary disk back-end, end to end", func=_cmd_demo,
        description="Start qemu-storage-daemon (or, when it is not installed, the module's "
                    "embedded back-end) on a temporary 64 MiB disk, probe it, write and read "
                    "back data, run a short benchmark, stop the back-end and remove its files, "
                    "also on Ctrl-C, SIGTERM or SIGHUP. qemu-storage-daemon is in the Debian "
                    "package %s." % _DEMO_PACKAGE,
        options=(
            _opt("--seconds", type=_seconds_arg, default=3.0, metavar="S",
                 help="benchmark duration (default 3)"),
            _opt("--embedded", action="store_true",
                 help="use the embedded back-end even if qemu-storage-daemon is installed"))),
    _command(
        "selftest", "check that this host and Python can run the module", func=_cmd_selftest,
        description="Check, one line each, what the module needs from the host and the "
                    "interpreter: memfd with seals, eventfd, SCM_RIGHTS, shared mappings, ring "
                    "index ordering between two processes, then a virtio-blk and a virtio-net "
                    "device end to end against the embedded back-end. Stops at the first "
                    "failure (exit status 1). Needs nothing installed."),
)


def _build_parser():
    """The command line's parser from ``_CLI_COMMANDS``: (parser, its commands, -v/--timeout)."""
    import argparse
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given after the subcommand must not reset one given before it.
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log every vhost-user message sent and received (stderr)")
    common.add_argument("--timeout", type=_seconds_arg, default=argparse.SUPPRESS, metavar="S",
                        help="seconds to wait for any reply or completion (default 5)")
    ring = argparse.ArgumentParser(add_help=False)
    _add_options(ring, _RING_OPTIONS)
    parser = argparse.ArgumentParser(
        prog=_PROG, parents=[common],
        description="Talk to a vhost-user back-end (qemu-storage-daemon, DPDK, virtiofsd, "
                    "rust-vmm and crosvm devices, SPDK) from the front-end side.",
        epilog="Errors are reported in one line; the exit status is 1 for a failure "
               "and 2 for bad usage.")
    parser.add_argument("--version", action="version", version="%s %s" % (_PROG, __version__))
    commands = _add_commands(parser, ("command", "COMMAND", _CLI_COMMANDS),
                             {"common": common, "ring": ring})
    return parser, commands, common


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line (``python3 vhost_user_frontend.py --help``); returns the exit status."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _AsciiFallback.around(sys.stdout), _AsciiFallback.around(sys.stderr)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = saved


class _AsciiFallback:
    """A text stream writing ``us`` for ``µs`` and ASCII tree lines where the encoding lacks them.

    CPython 3.6 in the C locale (``env -i``, a bare container) writes ASCII
    to stdout: "µs" in bench's report, the tree's box lines and "--help" of
    ``recv`` then raised UnicodeEncodeError (3.7+ switch to UTF-8 there,
    PEP 538/540). ``tree`` itself falls back to ``|--`` and `` `-- ``.
    """

    _SYMBOLS = "\u00b5\u2514\u251c\u2502\u2500"       # µ └ ├ │ ─
    _TABLE = str.maketrans({"\u00b5": "u", "\u2514": "`", "\u251c": "|", "\u2502": "|",
                            "\u2500": "-"})

    def __init__(self, stream):
        self._stream = stream

    @classmethod
    def around(cls, stream):
        """``stream`` itself when its encoding has the symbols (or it has none: StringIO)."""
        encoding = getattr(stream, "encoding", None)
        if not encoding or isinstance(stream, cls):
            return stream
        try:
            cls._SYMBOLS.encode(encoding)
        except (UnicodeEncodeError, LookupError):
            return cls(stream)
        return stream

    def write(self, text):
        return self._stream.write(text.translate(self._TABLE))

    def __getattr__(self, name):    # buffer, flush, isatty, fileno, encoding ...
        return getattr(self._stream, name)


def _main(argv):
    parser, _, _ = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else _EXIT_FAILURE
    args.verbose = getattr(args, "verbose", False)
    args.timeout = getattr(args, "timeout", 5.0)
    args.typed_argv = list(sys.argv[1:] if argv is None else argv)
    if args.verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(relativeCreated)8.1f ms %(message)s"))
        _log.setLevel(logging.DEBUG)
    else:
        # Without it logging's last-resort handler would print the worker's
        # warnings too, and the failure they lead to is reported in one line.
        handler = logging.NullHandler()
    _log.addHandler(handler)
    try:
        return args.func(args, sys.stdout)
    except KeyboardInterrupt as exc:
        sys.stderr.write("%s: interrupted%s\n" % (_PROG, _transfer_suffix(exc)))
        return 130
    except _Terminated as exc:
        import signal
        sys.stderr.write("%s: terminated by %s, cleaned up%s\n"
                         % (_PROG, signal.Signals(exc.signum).name, _transfer_suffix(exc)))
        return 128 + exc.signum
    except _UsageError as exc:
        sys.stderr.write("%s: error: %s\n" % (_PROG, exc))
        return _EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`... | head -1`): stop silently, as cat does,
        # with the status a shell shows for a process that SIGPIPE killed.
        _silence_stdout()
        return _EXIT_BROKEN_PIPE
    except (_CliError, VhostUserError, OSError, ValueError) as exc:
        message = _one_line(exc)
        if isinstance(exc, VhostUserTimeout):
            message = "timeout: " + message
        elif isinstance(exc, Disconnected):
            message = "back-end disconnected: " + message
        if isinstance(exc, VhostUserError):
            message = "%s: %s" % (args.socket, message)
        sys.stderr.write("%s: error: %s%s\n" % (_PROG, message, _transfer_suffix(exc)))
        return _EXIT_FAILURE
    finally:
        _log.removeHandler(handler)
        _log.setLevel(logging.NOTSET)


def _silence_stdout():
    """Point stdout at /dev/null, so the flush at exit does not hit the broken pipe again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (tests capture it): nothing is flushed at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
