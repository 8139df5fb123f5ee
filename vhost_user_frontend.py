# SPDX-License-Identifier: BSD-3-Clause
# Copyright 2026 The vhost_user_frontend.py Authors
"""A vhost-user front-end (the VMM side) in one pure-Python file.

Drives any vhost-user back-end daemon (qemu-storage-daemon, virtiofsd, DPDK's
vhost PMD, rust-vmm vhost-device-*, crosvm device back-ends, SPDK) with no VM,
no compiler and no third-party package. Because there is no guest, this module
is also the virtio *driver*: it owns guest memory (memfd), lays out the
virtqueues there, posts descriptor chains, kicks, and reaps used entries.

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
Errors, Constants, Wire format, OS primitives, Channel, BackendClient,
GuestMemory, Queue, Backend requests, Worker, VhostUserFrontend, Devices, CLI.
"""

import array
import collections
import ctypes
import enum
import errno
import functools
import logging
import mmap
import os
import select
import socket
import struct
import sys
import threading
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

__version__ = "0.1.0"

__all__ = [
    # Errors
    "VhostUserError", "ProtocolError", "BackendError", "Disconnected",
    "FeatureNotNegotiated", "VhostUserTimeout",
    # Constants
    "FrontendReq", "BackendReq", "VirtioFeature", "ProtocolFeature", "DeviceType",
    # Wire payloads
    "VringState", "VringAddr", "MemoryRegion", "LogInfo", "IotlbMsg",
    "DeviceConfig", "VringArea", "InflightInfo", "ShmemMap", "ShmemConfig",
    # OS, client, memory
    "Event", "BackendClient", "GuestMemory", "Queue",
    # Devices
    "BlockDevice", "NetDevice",
]

_log = logging.getLogger(__name__)


# ##########################################################################
# Errors ###################################################################
# ##########################################################################

class VhostUserError(Exception):
    """Base of every error this module raises about the vhost-user session.

    ``request`` is the request being served when the error happened (a
    ``FrontendReq``/``BackendReq`` member, a raw int for an unknown code, or
    None).
    """

    def __init__(self, message, request=None):
        super().__init__(message)
        self.request = request


class ProtocolError(VhostUserError):
    """The peer sent something malformed, unexpected, or with the wrong fds."""


class BackendError(VhostUserError):
    """The back-end reported failure (non-zero ack or status); see ``value``."""

    def __init__(self, message, request=None, value=None):
        super().__init__(message, request)
        self.value = value


class Disconnected(VhostUserError, ConnectionError):
    """The peer closed the connection (EOF, EPIPE, ECONNRESET)."""


class FeatureNotNegotiated(VhostUserError):
    """The request needs a feature that was not negotiated; nothing was sent."""


class VhostUserTimeout(VhostUserError, TimeoutError):
    """The peer did not answer in time; the connection is unusable after it."""


# ##########################################################################
# Constants ################################################################
# ##########################################################################

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
    def names(cls, features, device_type=None):
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
    def names(cls, features):
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

    @property
    def min_queues(self):
        """Queues a spec-compliant device of this type must implement (crosvm)."""
        return _MIN_QUEUES[self]

    def feature_names(self, features):
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


# ##########################################################################
# Wire format ##############################################################
# ##########################################################################
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
    index: int
    num: int


class VringAddr(NamedTuple):
    """ADDR payload. Used comes *before* avail on the wire."""
    index: int
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
    index: int
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

    def regions(self):
        """(shmid, size) of each region in use, capped at ``nregions``."""
        used = [(i, s) for i, s in enumerate(self.sizes) if s]
        return used[:self.nregions]


def _check_u64(name, value):
    if not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise ValueError("%s must be an unsigned 64-bit integer, got %r" % (name, value))


def _check_u32(name, value):
    if not isinstance(value, int) or not 0 <= value < 1 << 32:
        raise ValueError("%s must be an unsigned 32-bit integer, got %r" % (name, value))


def encode_header(request, flags, size):
    """The 12-byte message header."""
    return _HDR.pack(int(request), flags, size)


def decode_header(data):
    """(request, flags, size) of a 12-byte header; the request stays an int."""
    if len(data) != _HDR.size:
        raise ProtocolError("header must be %d bytes, got %d" % (_HDR.size, len(data)))
    return _HDR.unpack(data)


def encode_u64(value):
    _check_u64("value", value)
    return _U64.pack(value)


def decode_u64(request, body):
    _expect_size(request, body, _U64.size)
    return _U64.unpack(body)[0]


def encode_state(state):
    _check_u32("index", state.index)
    _check_u32("num", state.num)
    return _STATE.pack(*state)


def decode_state(request, body):
    _expect_size(request, body, _STATE.size)
    return VringState._make(_STATE.unpack(body))


def encode_vring_addr(addr):
    for name, value in zip(addr._fields, addr):
        (_check_u32 if name in ("index", "flags") else _check_u64)(name, value)
    return _ADDR.pack(*addr)


def decode_vring_addr(request, body):
    _expect_size(request, body, _ADDR.size)
    return VringAddr._make(_ADDR.unpack(body))


def encode_mem_table(regions):
    """MEM payload: the true region count, then each region (not padded to 8)."""
    parts = [_MEM_HDR.pack(len(regions), 0)]
    for region in regions:
        for name, value in zip(region._fields, region):
            _check_u64(name, value)
        parts.append(_REGION.pack(*region))
    return b"".join(parts)


def decode_mem_table(request, body):
    if len(body) < _MEM_HDR.size:
        raise ProtocolError("%s: MEM payload of %d bytes is shorter than its header"
                            % (_req_name(request), len(body)), request)
    count, padding = _MEM_HDR.unpack_from(body)
    _expect_size(request, body, _MEM_HDR.size + count * _REGION.size)
    _expect_zero(request, "padding", padding)
    return [MemoryRegion._make(_REGION.unpack_from(body, _MEM_HDR.size + i * _REGION.size))
            for i in range(count)]


def encode_mem_region(region):
    for name, value in zip(region._fields, region):
        _check_u64(name, value)
    return _MEMREG.pack(0, *region)


def decode_mem_region(request, body):
    _expect_size(request, body, _MEMREG.size)
    fields = _MEMREG.unpack(body)
    _expect_zero(request, "padding", fields[0])
    return MemoryRegion._make(fields[1:])


def encode_config(config):
    _check_u32("offset", config.offset)
    _check_u32("flags", config.flags)
    return _CONFIG_HDR.pack(config.offset, len(config.data), config.flags) + bytes(config.data)


def decode_config(request, body):
    if len(body) < _CONFIG_HDR.size:
        raise ProtocolError("%s: CONFIG payload of %d bytes is shorter than its header"
                            % (_req_name(request), len(body)), request)
    offset, size, flags = _CONFIG_HDR.unpack_from(body)
    _expect_size(request, body, _CONFIG_HDR.size + size)
    return DeviceConfig(offset, flags, bytes(body[_CONFIG_HDR.size:]))


def encode_vring_area(area):
    index = area.index | (_VRING_NOFD if area.no_fd else 0)
    return _AREA.pack(index, area.size, area.offset)


def decode_vring_area(request, body):
    _expect_size(request, body, _AREA.size)
    value, size, offset = _AREA.unpack(body)
    if value & ~(_VRING_IDX_MASK | _VRING_NOFD):
        raise ProtocolError("%s: reserved bits set in the ring index field: %#x"
                            % (_req_name(request), value), request)
    return VringArea(value & _VRING_IDX_MASK, bool(value & _VRING_NOFD), size, offset)


def encode_inflight(info):
    return _INFLIGHT.pack(*info)


def decode_inflight(request, body):
    _expect_size(request, body, _INFLIGHT.size)
    return InflightInfo._make(_INFLIGHT.unpack(body))


def encode_iotlb(msg):
    return _IOTLB.pack(*msg)


def decode_iotlb(request, body):
    _expect_size(request, body, _IOTLB.size)
    return IotlbMsg._make(_IOTLB.unpack(body))


def encode_shmem_map(msg):
    return _MMAP.pack(*msg)


def decode_shmem_map(request, body):
    _expect_size(request, body, _MMAP.size)
    return ShmemMap._make(_MMAP.unpack(body))


def decode_shmem_config(request, body):
    _expect_size(request, body, _SHMCFG.size)
    fields = _SHMCFG.unpack(body)
    nregions, padding, sizes = fields[0], fields[1], fields[2:]
    _expect_zero(request, "padding", padding)
    if nregions > _SHMEM_COUNT:
        raise ProtocolError("%s: nregions %d is more than %d"
                            % (_req_name(request), nregions, _SHMEM_COUNT), request)
    return ShmemConfig(nregions, tuple(sizes))


def encode_vring_fd_index(index, has_fd):
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


# ##########################################################################
# OS primitives ############################################################
# ##########################################################################

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


def memfd_create(name, size):
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

    def __init__(self):
        self._fd = _eventfd()

    def fileno(self):
        if self._fd < 0:
            raise ValueError("Event is closed")
        return self._fd

    def signal(self):
        """Add one to the counter, waking any waiter."""
        try:
            os.write(self.fileno(), _ONE)
        except BlockingIOError:
            pass  # counter saturated: it is signalled anyway

    def read(self):
        """Take and return the counter (0 when not signalled); never blocks."""
        try:
            return struct.unpack("=Q", os.read(self.fileno(), 8))[0]
        except BlockingIOError:
            return 0

    def wait(self, timeout=None):
        """Wait until signalled and reset it; the count, or 0 on timeout."""
        fd = self.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            count = self.read()
            if count:
                return count
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                return 0
            poller.poll(None if remaining is None else remaining * 1000.0)

    def close(self):
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
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


def _pipe():
    """A close-on-exec pipe: (read_fd, write_fd)."""
    return os.pipe2(os.O_CLOEXEC)


def _close_fds(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ##########################################################################
# Channel ##################################################################
# ##########################################################################

_CMSG_BUFSIZE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
#: Largest message body we read from a peer (rust-vmm MAX_MSG_SIZE is 4096;
#: GET_SHMEM_CONFIG's 2056 bytes is the largest reply the spec defines).
_MAX_BODY = 0x1000


class _Channel:
    """Framed vhost-user messages with SCM_RIGHTS over a unix stream socket.

    The only code in the module that calls ``sendmsg``/``recvmsg``. It knows
    framing and fd accounting, not what any request means.
    """

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
            raise Disconnected("%s: send failed: %s" % (what, exc), request) from exc
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("-> %s flags=%#x size=%d fds=%d", what, flags, len(body), len(fds))

    def recv_header(self, what, timeout=None):
        """(request, flags, size, fds) of the next message; fds are owned by the caller."""
        header, fds = self._recv_exact(_HDR.size, what, first=True, timeout=timeout)
        request, flags, size = _HDR.unpack(header)
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
        """Read exactly ``size`` bytes; fds are legal only with the first byte."""
        chunks = []
        fds = []
        got = 0
        deadline = None
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            while got < size:
                try:
                    data, ancdata, msg_flags, _ = self.sock.recvmsg(
                        size - got, _CMSG_BUFSIZE, _RECV_FLAGS)
                except socket.timeout:
                    raise VhostUserTimeout(
                        "%s: no %s from the back-end within %.1f s"
                        % (what, "reply" if first and not got else "rest of the message",
                           self.sock.gettimeout()))
                except InterruptedError:
                    continue
                except ConnectionResetError as exc:
                    raise Disconnected("%s: connection reset by the back-end" % what) from exc
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
            if timeout is not None:
                self.sock.settimeout(self.timeout)
        del deadline
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
        self.sock.close()


# ##########################################################################
# BackendClient ############################################################
# ##########################################################################

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
    _F.GET_VRING_BASE_SKIP_DRAIN: _P.GET_VRING_BASE_SKIP_DRAIN,
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

    _channel = None

    def __init__(self, sock, timeout=5.0):
        """Wrap an already connected unix stream socket (the client owns it).

        Args:
            sock: a connected ``AF_UNIX``/``SOCK_STREAM`` socket.
            timeout: seconds to wait for any reply before ``VhostUserTimeout``.
        """
        self._channel = _Channel(sock, timeout)
        self._lock = threading.Lock()
        self._broken = None
        self.features = None
        self.acked_features = None
        self.protocol_features = 0
        self.queue_num = None
        self.max_mem_slots = None

    @classmethod
    def connect(cls, path, timeout=10.0, reply_timeout=5.0):
        """Connect to a back-end listening on ``path``.

        Retries while the socket does not exist yet or refuses connections,
        as crosvm does, until ``timeout`` seconds have passed.

        Raises:
            Disconnected: nothing accepted the connection in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                sock.connect(path)
                return cls(sock, reply_timeout)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise Disconnected("cannot connect to %s within %.1f s: %s"
                                       % (path, timeout, exc.strerror)) from exc
                time.sleep(0.001 if time.monotonic() + 0.001 < deadline else 0)
            except socket.timeout as exc:
                sock.close()
                raise Disconnected("cannot connect to %s: timed out after %.1f s"
                                   % (path, timeout)) from exc
            except BaseException:
                sock.close()
                raise

    @classmethod
    def listen(cls, path, timeout=30.0, reply_timeout=5.0):
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
            return cls(sock, reply_timeout)
        except BaseException:
            sock.close()
            raise

    # -- plumbing -----------------------------------------------------------

    @property
    def timeout(self):
        """Seconds to wait for a reply."""
        return self._channel.timeout

    @timeout.setter
    def timeout(self, value):
        self._channel.timeout = value
        self._channel.sock.settimeout(value)

    @property
    def broken(self):
        """The error that made the connection unusable, or None."""
        return self._broken

    def fileno(self):
        """The socket's fd (for polling it for hang-up)."""
        return self._channel.fileno()

    def close(self):
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
        needed = _REQUEST_NEEDS.get(request)
        if needed is not None and not self.protocol_features & needed:
            raise FeatureNotNegotiated(
                "%s needs protocol feature %s, which was not negotiated"
                % (request.name, needed.name), request)

    def _want_ack(self, request, ack):
        negotiated = bool(self.protocol_features & _P.REPLY_ACK)
        if ack is None:
            return negotiated and request in _ACKED_BY_DEFAULT
        if ack and not negotiated:
            raise FeatureNotNegotiated("%s: an ack needs REPLY_ACK, which was not negotiated"
                                       % request.name, request)
        return bool(ack)

    def _transact(self, request, body=b"", fds=(), reply=None, ack=False):
        """Send ``request``; return (body, fds) of its reply, or None.

        ``reply`` describes a mandatory reply; otherwise ``ack`` asks for a
        REPLY_ACK and checks it. The caller owns the returned fds.
        """
        self._check_usable(request)
        with self._lock:
            self._check_usable(request)
            channel = self._channel
            flags = _VERSION | (_FLAG_NEED_REPLY if ack and reply is None else 0)
            try:
                channel.send(request, flags, body, fds)
                if reply is None and not ack:
                    return None
                expect = reply or _REPLY_U64
                got = self._receive_reply(request, expect)
            except (ProtocolError, Disconnected, VhostUserTimeout) as exc:
                if exc.request is None:
                    exc.request = request
                self._broken = exc
                raise
        if reply is not None:
            return got
        reply_body, _ = got
        value = _U64.unpack(reply_body)[0]
        if value:
            raise BackendError("%s: back-end replied with error %d" % (request.name, value),
                               request, value)
        return None

    def _receive_reply(self, request, expect):
        name = request.name
        code, flags, size, fds = self._channel.recv_header(name)
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
            body = self._channel.recv_body(size, name)
            if len(fds) not in expect.fds:
                raise ProtocolError("%s: reply carries %d fd(s), expected %s"
                                    % (name, len(fds), " or ".join(map(str, expect.fds))))
        except BaseException:
            _close_fds(fds)
            raise
        return body, fds

    def _get_u64(self, request):
        body, _ = self._transact(request, reply=_REPLY_U64)
        return _U64.unpack(body)[0]

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
        self._transact(request, encode_vring_fd_index(index, bool(fds)), fds,
                       ack=self._want_ack(request, ack))

    # -- requests, in spec order ----------------------------------------------

    def get_features(self):
        """VHOST_USER_GET_FEATURES: the back-end's virtio features."""
        self.features = self._get_u64(_F.GET_FEATURES)
        return self.features

    def set_features(self, features, ack=None):
        """VHOST_USER_SET_FEATURES: the features the driver accepted.

        Include PROTOCOL_FEATURES (bit 30) when the back-end offered it: old
        QEMU left it out and broke rust-vmm back-ends (rust-vmm/vhost#227).
        """
        if ack is None:  # QEMU waits for this one only while logging dirty pages
            ack = bool(features & VirtioFeature.LOG_ALL) and bool(
                self.protocol_features & _P.REPLY_ACK)
        self._set_u64(_F.SET_FEATURES, int(features), ack)
        self.acked_features = int(features)

    def set_owner(self, ack=None):
        """VHOST_USER_SET_OWNER: start the session."""
        self._transact(_F.SET_OWNER, ack=self._want_ack(_F.SET_OWNER, ack))

    def reset_owner(self, ack=None):
        """VHOST_USER_RESET_OWNER (deprecated): back-ends disable every ring."""
        self._transact(_F.RESET_OWNER, ack=self._want_ack(_F.RESET_OWNER, ack))

    def set_mem_table(self, regions, ack=None):
        """VHOST_USER_SET_MEM_TABLE: the guest memory, one fd per region.

        Args:
            regions: (MemoryRegion, fd) pairs, as ``GuestMemory.regions()``
                returns them. At most 8 without CONFIGURE_MEM_SLOTS.
        """
        regions = list(regions)
        limit = MAX_MEM_TABLE_REGIONS
        if self.protocol_features & _P.CONFIGURE_MEM_SLOTS and self.max_mem_slots:
            limit = self.max_mem_slots
        if not 1 <= len(regions) <= limit:
            raise ValueError("SET_MEM_TABLE: %d regions, the back-end takes 1..%d"
                             % (len(regions), limit))
        _check_regions("SET_MEM_TABLE", [r for r, _ in regions])
        self._transact(_F.SET_MEM_TABLE, encode_mem_table([r for r, _ in regions]),
                       [_fileno(fd) for _, fd in regions],
                       ack=self._want_ack(_F.SET_MEM_TABLE, ack))

    def set_log_base(self, mmap_size, mmap_offset=0, fd=None):
        """VHOST_USER_SET_LOG_BASE: the dirty log (QEMU's 16-byte LOG payload).

        With LOG_SHMFD the fd is sent and a reply is mandatory; QEMU checks
        only its code, rust-vmm sends 16 bytes and QEMU's own test stub 0, so
        0, 8 and 16 bytes are all accepted (PROTOCOL.md 8.12).
        """
        body = _LOG.pack(mmap_size, mmap_offset)
        if self.protocol_features & _P.LOG_SHMFD:
            if fd is None:
                raise ValueError("SET_LOG_BASE: LOG_SHMFD is negotiated, an fd is required")
            _, fds = self._transact(_F.SET_LOG_BASE, body, (_fileno(fd),),
                                    reply=_Reply((0, 8, 16)))
            _close_fds(fds)
        else:
            fds = () if fd is None else (_fileno(fd),)
            self._transact(_F.SET_LOG_BASE, body, fds)

    def set_log_fd(self, fd, ack=None):
        """VHOST_USER_SET_LOG_FD: eventfd the back-end signals after logging."""
        self._transact(_F.SET_LOG_FD, b"", (_fileno(fd),),
                       ack=self._want_ack(_F.SET_LOG_FD, ack))

    def set_vring_num(self, index, num, ack=None):
        """VHOST_USER_SET_VRING_NUM: the ring's size (a power of two <= 32768)."""
        self._check_ring(_F.SET_VRING_NUM, index)
        if not isinstance(num, int) or not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise ValueError("SET_VRING_NUM: ring size %r is not a power of two in 1..%d"
                             % (num, MAX_QUEUE_SIZE))
        self._transact(_F.SET_VRING_NUM, _STATE.pack(index, num),
                       ack=self._want_ack(_F.SET_VRING_NUM, ack))

    def set_vring_addr(self, index, desc, used, avail, log=0, flags=0, ack=None):
        """VHOST_USER_SET_VRING_ADDR: ring addresses in the front-end's address space.

        Without IOMMU_PLATFORM or GPA_ADDRESSES these are front-end user
        addresses (``GuestMemory.host_address``), not guest-physical ones.
        Flags bit 0 (VHOST_VRING_F_LOG) makes QEMU wait for the ack.
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
                       encode_vring_addr(VringAddr(index, flags, desc, used, avail, log)),
                       ack=self._want_ack(_F.SET_VRING_ADDR, ack))

    def set_vring_base(self, index, base, ack=None):
        """VHOST_USER_SET_VRING_BASE: the next avail index the back-end processes."""
        self._check_ring(_F.SET_VRING_BASE, index)
        _check_u32("base", base)
        self._transact(_F.SET_VRING_BASE, _STATE.pack(index, base),
                       ack=self._want_ack(_F.SET_VRING_BASE, ack))

    def get_vring_base(self, index):
        """VHOST_USER_GET_VRING_BASE: stop the ring; returns its next avail index.

        The back-end drains in-flight requests first, which may take long.
        """
        return self._get_base(_F.GET_VRING_BASE, index)

    def _get_base(self, request, index):
        self._check_ring(request, index)
        body, _ = self._transact(request, _STATE.pack(index, 0), reply=_REPLY_STATE)
        state = VringState._make(_STATE.unpack(body))
        if state.index != index:
            self._broken = ProtocolError("%s: reply is for ring %d, asked for ring %d"
                                         % (request.name, state.index, index), request)
            raise self._broken
        return state.num

    def set_vring_kick(self, index, fd, ack=None):
        """VHOST_USER_SET_VRING_KICK: the kick eventfd (None: poll mode); starts the ring."""
        self._send_vring_fd(_F.SET_VRING_KICK, index, fd, ack)

    def set_vring_call(self, index, fd, ack=None):
        """VHOST_USER_SET_VRING_CALL: the call eventfd (None: no interrupts)."""
        self._send_vring_fd(_F.SET_VRING_CALL, index, fd, ack)

    def set_vring_err(self, index, fd, ack=None):
        """VHOST_USER_SET_VRING_ERR: the error eventfd (None: deregister)."""
        self._send_vring_fd(_F.SET_VRING_ERR, index, fd, ack)

    def get_protocol_features(self):
        """VHOST_USER_GET_PROTOCOL_FEATURES: the back-end's protocol features.

        Always ask on a new connection, even when the answer is known: some
        back-ends only start acking after seeing it (rust-vmm/vhost#290).
        """
        self._needs_protocol_bit(_F.GET_PROTOCOL_FEATURES)
        return ProtocolFeature(self._get_u64(_F.GET_PROTOCOL_FEATURES))

    def set_protocol_features(self, features):
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

    def get_queue_num(self):
        """VHOST_USER_GET_QUEUE_NUM: how many queues the back-end supports (MQ)."""
        self._require(_F.GET_QUEUE_NUM)
        value = self._get_u64(_F.GET_QUEUE_NUM)
        if not 0 < value <= MAX_VRINGS:
            self._broken = ProtocolError("GET_QUEUE_NUM: queue count %d out of range 1..%d"
                                         % (value, MAX_VRINGS), _F.GET_QUEUE_NUM)
            raise self._broken
        self.queue_num = value
        return value

    def set_vring_enable(self, index, enable, ack=None):
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

    def send_rarp(self, mac):
        """VHOST_USER_SEND_RARP: broadcast a RARP for ``mac`` (6 bytes). No reply."""
        self._require(_F.SEND_RARP)
        mac = bytes(mac)
        if len(mac) != 6:
            raise ValueError("SEND_RARP: a MAC address is 6 bytes, got %d" % len(mac))
        self._transact(_F.SEND_RARP, mac + b"\0\0")

    def net_set_mtu(self, mtu, ack=None):
        """VHOST_USER_NET_SET_MTU: the MTU the driver uses."""
        self._require(_F.NET_SET_MTU)
        self._set_u64(_F.NET_SET_MTU, mtu, ack)

    def set_backend_req_fd(self, fd, ack=None):
        """VHOST_USER_SET_BACKEND_REQ_FD: our end of the back-end request channel."""
        self._require(_F.SET_BACKEND_REQ_FD)
        self._transact(_F.SET_BACKEND_REQ_FD, b"", (_fileno(fd),),
                       ack=self._want_ack(_F.SET_BACKEND_REQ_FD, ack))

    def iotlb_msg(self, msg):
        """VHOST_USER_IOTLB_MSG: an IOTLB update or invalidation (always acked)."""
        self._require(_F.IOTLB_MSG)
        self._transact(_F.IOTLB_MSG, encode_iotlb(IotlbMsg(*msg)), ack=True)

    def set_vring_endian(self, index, big_endian):
        """VHOST_USER_SET_VRING_ENDIAN: legacy ring endianness. No reply."""
        self._require(_F.SET_VRING_ENDIAN)
        self._check_ring(_F.SET_VRING_ENDIAN, index)
        self._transact(_F.SET_VRING_ENDIAN, _STATE.pack(index, 1 if big_endian else 0))

    def get_config(self, offset, size, flags=CONFIG_FLAG_WRITABLE):
        """VHOST_USER_GET_CONFIG: ``size`` bytes of device config at ``offset``.

        Raises:
            BackendError: the back-end answered with size 0 (its error reply).
        """
        self._require(_F.GET_CONFIG)
        _check_config_window("GET_CONFIG", offset, size)
        request = encode_config(DeviceConfig(offset, flags, bytes(size)))
        body, _ = self._transact(_F.GET_CONFIG, request,
                                 reply=_Reply((_CONFIG_HDR.size + size, _CONFIG_HDR.size)))
        config = decode_config(_F.GET_CONFIG, body)
        if not config.data:
            raise BackendError("GET_CONFIG: back-end refused to read %d bytes at offset %d"
                               % (size, offset), _F.GET_CONFIG, 0)
        if config.offset != offset:
            self._broken = ProtocolError("GET_CONFIG: reply offset %d, asked for %d"
                                         % (config.offset, offset), _F.GET_CONFIG)
            raise self._broken
        return config.data

    def set_config(self, offset, data, flags=CONFIG_FLAG_WRITABLE, ack=None):
        """VHOST_USER_SET_CONFIG: write ``data`` into the device config at ``offset``."""
        self._require(_F.SET_CONFIG)
        data = bytes(data)
        _check_config_window("SET_CONFIG", offset, len(data))
        self._transact(_F.SET_CONFIG, encode_config(DeviceConfig(offset, flags, data)),
                       ack=self._want_ack(_F.SET_CONFIG, ack))

    def create_crypto_session(self, session):
        """VHOST_USER_CREATE_CRYPTO_SESSION: QEMU's session struct in, the same out."""
        self._require(_F.CREATE_CRYPTO_SESSION)
        session = bytes(session)
        body, _ = self._transact(_F.CREATE_CRYPTO_SESSION, session,
                                 reply=_Reply((len(session),)))
        return body

    def close_crypto_session(self, session_id):
        """VHOST_USER_CLOSE_CRYPTO_SESSION. No reply."""
        self._require(_F.CLOSE_CRYPTO_SESSION)
        _check_u64("session_id", session_id)
        self._transact(_F.CLOSE_CRYPTO_SESSION, _U64.pack(session_id))

    def postcopy_advise(self):
        """VHOST_USER_POSTCOPY_ADVISE: the back-end's userfaultfd (caller closes it)."""
        self._require(_F.POSTCOPY_ADVISE)
        _, fds = self._transact(_F.POSTCOPY_ADVISE, reply=_Reply((0, 8), (1,)))
        return fds[0]

    def postcopy_listen(self, ack=None):
        """VHOST_USER_POSTCOPY_LISTEN."""
        self._require(_F.POSTCOPY_LISTEN)
        self._transact(_F.POSTCOPY_LISTEN, ack=self._want_ack(_F.POSTCOPY_LISTEN, ack))

    def postcopy_end(self):
        """VHOST_USER_POSTCOPY_END: the back-end's result (0 = ok)."""
        self._require(_F.POSTCOPY_END)
        return self._get_u64(_F.POSTCOPY_END)

    def get_inflight_fd(self, num_queues, queue_size):
        """VHOST_USER_GET_INFLIGHT_FD: (InflightInfo, fd or None); caller closes the fd."""
        self._require(_F.GET_INFLIGHT_FD)
        body, fds = self._transact(
            _F.GET_INFLIGHT_FD, encode_inflight(InflightInfo(0, 0, num_queues, queue_size)),
            reply=_Reply((_INFLIGHT.size,), (0, 1)))
        info = decode_inflight(_F.GET_INFLIGHT_FD, body)
        if bool(info.mmap_size) != bool(fds):
            _close_fds(fds)
            self._broken = ProtocolError("GET_INFLIGHT_FD: mmap_size %d with %d fd(s)"
                                         % (info.mmap_size, len(fds)), _F.GET_INFLIGHT_FD)
            raise self._broken
        return info, (fds[0] if fds else None)

    def set_inflight_fd(self, info, fd, ack=None):
        """VHOST_USER_SET_INFLIGHT_FD: hand the inflight buffer back (reconnect)."""
        self._require(_F.SET_INFLIGHT_FD)
        self._transact(_F.SET_INFLIGHT_FD, encode_inflight(InflightInfo(*info)),
                       (_fileno(fd),), ack=self._want_ack(_F.SET_INFLIGHT_FD, ack))

    def gpu_set_socket(self, fd):
        """VHOST_USER_GPU_SET_SOCKET: the vhost-user-gpu side channel. No reply."""
        self._transact(_F.GPU_SET_SOCKET, b"", (_fileno(fd),))

    def reset_device(self, ack=None):
        """VHOST_USER_RESET_DEVICE: reset the whole device."""
        self._require(_F.RESET_DEVICE)
        self._transact(_F.RESET_DEVICE, ack=self._want_ack(_F.RESET_DEVICE, ack))

    def vring_kick(self, index, ack=None):
        """VHOST_USER_VRING_KICK: an in-band kick (INBAND_NOTIFICATIONS)."""
        self._require(_F.VRING_KICK)
        self._check_ring(_F.VRING_KICK, index)
        self._transact(_F.VRING_KICK, _STATE.pack(index, 0),
                       ack=self._want_ack(_F.VRING_KICK, ack))

    def get_max_mem_slots(self):
        """VHOST_USER_GET_MAX_MEM_SLOTS: how many regions the back-end can hold."""
        self._require(_F.GET_MAX_MEM_SLOTS)
        value = self._get_u64(_F.GET_MAX_MEM_SLOTS)
        if not value:
            self._broken = ProtocolError("GET_MAX_MEM_SLOTS: the back-end holds 0 regions",
                                         _F.GET_MAX_MEM_SLOTS)
            raise self._broken
        self.max_mem_slots = value
        return value

    def add_mem_reg(self, region, fd, ack=None):
        """VHOST_USER_ADD_MEM_REG: add one region (exactly one fd)."""
        self._require(_F.ADD_MEM_REG)
        _check_regions("ADD_MEM_REG", [MemoryRegion(*region)])
        self._transact(_F.ADD_MEM_REG, encode_mem_region(MemoryRegion(*region)),
                       (_fileno(fd),), ack=self._want_ack(_F.ADD_MEM_REG, ack))

    def rem_mem_reg(self, region, ack=None):
        """VHOST_USER_REM_MEM_REG: remove the region with this gpa, uaddr and size."""
        self._require(_F.REM_MEM_REG)
        self._transact(_F.REM_MEM_REG, encode_mem_region(MemoryRegion(*region)),
                       ack=self._want_ack(_F.REM_MEM_REG, ack))

    def set_status(self, status, ack=None):
        """VHOST_USER_SET_STATUS: the virtio device status byte."""
        self._require(_F.SET_STATUS)
        if not 0 <= status <= 0xFF:
            raise ValueError("SET_STATUS: status %r is not a byte" % (status,))
        self._set_u64(_F.SET_STATUS, status, ack)

    def get_status(self):
        """VHOST_USER_GET_STATUS: the virtio device status byte."""
        self._require(_F.GET_STATUS)
        value = self._get_u64(_F.GET_STATUS)
        if value > 0xFF:
            self._broken = ProtocolError("GET_STATUS: status %#x is not a byte" % value,
                                         _F.GET_STATUS)
            raise self._broken
        return value

    def get_shared_object(self, uuid):
        """VHOST_USER_GET_SHARED_OBJECT: the dma-buf fd for a 16-byte UUID (caller closes it)."""
        self._require(_F.GET_SHARED_OBJECT)
        uuid = bytes(uuid)
        if len(uuid) != _UUID_SIZE:
            raise ValueError("GET_SHARED_OBJECT: a UUID is 16 bytes, got %d" % len(uuid))
        body, fds = self._transact(_F.GET_SHARED_OBJECT, uuid, reply=_Reply((0, 8), (0, 1)))
        value = _U64.unpack(body)[0] if body else 0
        if value or not fds:
            _close_fds(fds)
            raise BackendError("GET_SHARED_OBJECT: back-end has no object for that UUID "
                               "(value %d)" % value, _F.GET_SHARED_OBJECT, value)
        return fds[0]

    def set_device_state_fd(self, direction, phase, fd):
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
        body, fds = self._transact(_F.SET_DEVICE_STATE_FD, _XFER.pack(direction, phase),
                                   (_fileno(fd),), reply=_Reply((_U64.size,), (0, 1)))
        value = _U64.unpack(body)[0]
        error = value & 0xFF
        no_fd = bool(value & _DEVICE_STATE_NO_FD)
        if value & ~0x1FF or (fds and (error or no_fd)) or (not fds and not no_fd and not error):
            _close_fds(fds)
            self._broken = ProtocolError("SET_DEVICE_STATE_FD: reply value %#x with %d fd(s)"
                                         % (value, len(fds)), _F.SET_DEVICE_STATE_FD)
            raise self._broken
        if error:
            raise BackendError("SET_DEVICE_STATE_FD: back-end refused the transfer (error %d)"
                               % error, _F.SET_DEVICE_STATE_FD, error)
        return fds[0] if fds else None

    def check_device_state(self):
        """VHOST_USER_CHECK_DEVICE_STATE: raise BackendError unless the transfer succeeded."""
        self._require(_F.CHECK_DEVICE_STATE)
        value = self._get_u64(_F.CHECK_DEVICE_STATE)
        if value:
            raise BackendError("CHECK_DEVICE_STATE: back-end reports the state transfer "
                               "failed (%d)" % value, _F.CHECK_DEVICE_STATE, value)

    def get_shmem_config(self):
        """VHOST_USER_GET_SHMEM_CONFIG: the device's shared memory regions."""
        self._require(_F.GET_SHMEM_CONFIG)
        body, _ = self._transact(_F.GET_SHMEM_CONFIG, reply=_Reply((_SHMCFG.size,)))
        return decode_shmem_config(_F.GET_SHMEM_CONFIG, body)

    def get_vring_base_skip_drain(self, index):
        """VHOST_USER_GET_VRING_BASE_SKIP_DRAIN: stop the ring without draining it."""
        self._require(_F.GET_VRING_BASE_SKIP_DRAIN)
        return self._get_base(_F.GET_VRING_BASE_SKIP_DRAIN, index)


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


# ##########################################################################
# GuestMemory ##############################################################
# ##########################################################################

_PAGE_SIZE = mmap.PAGESIZE


class _Region:
    """One memfd-backed shared mapping at a guest-physical address."""

    def __init__(self, guest_addr, size, name):
        self.guest_addr = guest_addr
        self.size = size
        self.fd = memfd_create(name, size)
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

    def __init__(self, layout, name="vhost-user-guest"):
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
    def size(self):
        """Total bytes of guest RAM."""
        return sum(r.size for r in self._regions)

    def regions(self):
        """(MemoryRegion, fd) per region, as SET_MEM_TABLE and ADD_MEM_REG want them."""
        self._check_open()
        return [(MemoryRegion(r.guest_addr, r.size, r.address, 0), r.fd) for r in self._regions]

    def region_for(self, guest_addr):
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

    def host_address(self, guest_addr):
        """This process's virtual address of ``guest_addr`` (the vhost-user uaddr)."""
        region = self._find(guest_addr, 1)
        return region.address + guest_addr - region.guest_addr

    def view(self, guest_addr, length):
        """A zero-copy writable memoryview of ``length`` bytes at ``guest_addr``."""
        region = self._find(guest_addr, length)
        offset = guest_addr - region.guest_addr
        return region.view[offset:offset + length]

    def read(self, guest_addr, length):
        """Copy ``length`` bytes out of guest memory."""
        return bytes(self.view(guest_addr, length))

    def write(self, guest_addr, data):
        """Copy ``data`` into guest memory at ``guest_addr``."""
        data = memoryview(data).cast("B")
        self.view(guest_addr, len(data))[:] = data

    def allocate(self, size, align=16):
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

    def free(self, guest_addr):
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

    def close(self):
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


# ##########################################################################
# Queue ####################################################################
# ##########################################################################
# Split virtqueue layout (virtio spec 2.7): descriptor table 16 bytes per
# entry, 16-aligned; avail ring flags, idx, ring[size], used_event; used ring
# flags, idx, ring[size] of (id u32, len u32), avail_event; 2- and 4-aligned.
#
# Memory ordering. The back-end reads and writes these rings from another
# CPU while we touch them through the mmap, and Python has no barriers. What
# we rely on:
# - Every ring index and used element is written and read as one aligned
#   access of its own width, through a memoryview cast to "H" or "I" (CPython
#   copies a cast item with a fixed-size memcpy that compilers emit as one
#   move; struct.pack_into may store byte by byte), so the back-end never sees
#   a torn avail->idx. virtio 1.0 rings are little-endian, and so must the
#   host be (checked in ``Queue.__init__``).
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
#   order), each a full barrier for our purpose. It costs well under a
#   microsecond and is taken once per notify decision and once per re-arm,
#   never per descriptor.

_DESC = struct.Struct("<QIHH")      # addr, len, flags, next

#: Descriptor flags (virtio spec 2.7.5).
_DESC_F_NEXT = 1
_DESC_F_WRITE = 2
_DESC_F_INDIRECT = 4
#: avail->flags: the driver does not want interrupts (spec 2.7.7).
_AVAIL_F_NO_INTERRUPT = 1
#: used->flags: the device does not want kicks (spec 2.7.10).
_USED_F_NO_NOTIFY = 1
#: Seconds a completion wait polls used->idx before sleeping on the call
#: eventfd: a cross-vCPU wake-up costs ~50 us here (BACKENDS.md 6).
_DEFAULT_SPIN = 50e-6
#: Longest buffer one descriptor can describe.
_MAX_DESC_LEN = 0xFFFFFFFF


def _split_ring_sizes(size):
    """(desc, avail, used) byte sizes of a split ring of ``size`` entries."""
    return 16 * size, 6 + 2 * size, 6 + 8 * size


def _need_event(event, new, old):
    """vring_need_event (spec 2.7.10): did idx cross ``event`` going old -> new?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


@functools.lru_cache(maxsize=None)
def _strongly_ordered():
    """True on x86, whose TSO keeps store->store and load->load order."""
    return os.uname().machine in ("x86_64", "amd64", "i386", "i486", "i586", "i686")


class _Fences:
    """The barriers the split ring needs (see the Queue section's comment)."""

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


class _Chain:
    """Driver bookkeeping for one chain in flight (never read back from the ring)."""

    __slots__ = ("token", "descs", "writable", "copy_out", "block")

    def __init__(self, token, descs, writable, copy_out, block):
        self.token = token
        self.descs = descs          # ring descriptor indices to free
        self.writable = writable    # bytes the device may write
        self.copy_out = copy_out    # (guest_addr, caller buffer) to copy back
        self.block = block          # guest allocation (bounce + indirect) or None


class _QueueFull(VhostUserError):
    """The ring has no free descriptor for the chain: reap used entries and retry."""


class Queue:
    """One split virtqueue in guest memory, and the driver that fills it.

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

    Args:
        mem: the ``GuestMemory`` to allocate the ring in.
        size: number of entries, a power of two up to 32768.
        index: the queue's index in its device.
        vector: the interrupt vector (MSI-X style); None for the shared event.
        features: the negotiated virtio features; RING_EVENT_IDX and
            RING_INDIRECT_DESC change how the driver side works. May also be
            set later through the ``features`` attribute, before first use.
    """

    #: Raised by ``add`` when the ring is full: reap used entries and retry.
    Full = _QueueFull
    #: Chains of at least this many buffers go through one indirect table
    #: when RING_INDIRECT_DESC was negotiated (shorter ones too when the
    #: ring has too few free descriptors).
    indirect_threshold = 4

    _block = None
    _views = ()

    def __init__(self, mem, size, index=0, vector=None, features=0):
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
        self.features = features
        self.spin = _DEFAULT_SPIN
        desc_bytes, avail_bytes, used_bytes = _split_ring_sizes(size)
        total = desc_bytes + avail_bytes + 2 + used_bytes
        self._block = mem.allocate(total, align=4096)
        self.desc_table = self._block
        self.avail_ring = self.desc_table + desc_bytes
        self.used_ring = (self.avail_ring + avail_bytes + 3) & ~3
        self.kick = None
        self.call = None
        try:
            mem.view(self._block, total)[:] = bytes(total)
            self._desc = mem.view(self.desc_table, desc_bytes)
            # avail: [0] flags, [1] idx, [2 + i] ring[i], [2 + size] used_event
            self._avail = mem.view(self.avail_ring, avail_bytes).cast("H")
            # used: [0] flags, [1] idx; elements as (id, len) pairs; avail_event
            self._used = mem.view(self.used_ring, 4).cast("H")
            self._used_elems = mem.view(self.used_ring + 4, 8 * size).cast("I")
            self._avail_event = mem.view(self.used_ring + 4 + 8 * size, 2).cast("H")
            self._views = (self._desc, self._avail, self._used, self._used_elems,
                           self._avail_event)
            self.kick = Event()
            self.call = Event()
        except BaseException:
            self.close()
            raise
        self._lock = threading.Lock()
        self._fences = _Fences()
        self._free = list(range(size - 1, -1, -1))  # a stack: pop() gives 0 first
        self._chains = {}         # head descriptor -> _Chain
        self._kicked = 0          # avail idx at the last notify decision
        self._serial = 0
        self._broken = None

    @property
    def features(self):
        """The negotiated virtio features the driver side honours."""
        return self._features

    @features.setter
    def features(self, value):
        self._features = int(value)
        self._event_idx = bool(value & VirtioFeature.RING_EVENT_IDX)
        self._indirect = bool(value & VirtioFeature.RING_INDIRECT_DESC)

    @property
    def num_free(self):
        """Free descriptors in the ring."""
        return len(self._free)

    @property
    def in_flight(self):
        """Chains posted and not yet reaped."""
        return len(self._chains)

    def used_index(self):
        """The device's used->idx as it is in guest memory now."""
        return self._used[1]

    def reclaim(self, base):
        """Take the queue back after the back-end stopped it (crosvm vhost_user_reclaim).

        ``base`` is GET_VRING_BASE's answer, the next avail index the back-end
        would have processed; the used index is read from guest memory (split
        rings do not return it).
        """
        if not 0 <= base <= 0xFFFF:
            raise ProtocolError("GET_VRING_BASE: base %#x does not fit in 16 bits" % base,
                                FrontendReq.GET_VRING_BASE)
        self.next_avail = self._kicked = base
        self.next_used = self.used_index()

    # -- driver side: posting ---------------------------------------------------

    def add(self, readable=(), writable=(), token=None):
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
            count >= self.indirect_threshold or count > len(self._free))
        table_bytes = 16 * count if indirect else 0
        block = None
        if table_bytes or bounce:
            # Bounce buffers and the indirect table share one allocation, filled
            # outside the lock so a big copy does not hold up other threads.
            block = self.mem.allocate(table_bytes + bounce, align=16)
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
                last = count - 1
                for i, (gpa, length, flags) in enumerate(resolved):
                    _DESC.pack_into(table, 16 * i, gpa, length,
                                    flags | (_DESC_F_NEXT if i < last else 0),
                                    i + 1 if i < last else 0)
                table.release()
            with self._lock:
                self._check_usable()
                if (1 if indirect else count) > len(self._free):
                    raise _QueueFull("queue %d: chain of %d descriptors, %d free"
                                     % (self.index, count, len(self._free)))
                if token is None:
                    self._serial += 1
                    token = self._serial
                self._post(resolved, indirect, block, table_bytes,
                           _Chain(token, None, writable_bytes, outs, block))
        except BaseException:
            if block is not None:
                self.mem.free(block)
            raise
        return token

    def _post(self, resolved, indirect, block, table_bytes, chain):
        """Write the ring descriptors and publish the chain (under the lock)."""
        if indirect:
            descs = [self._free.pop()]
            _DESC.pack_into(self._desc, 16 * descs[0], block, table_bytes, _DESC_F_INDIRECT, 0)
        else:
            count = len(resolved)
            descs = self._free[-count:]
            descs.reverse()
            del self._free[-count:]
            desc = self._desc
            last = count - 1
            for i, (gpa, length, flags) in enumerate(resolved):
                if i < last:
                    _DESC.pack_into(desc, 16 * descs[i], gpa, length, flags | _DESC_F_NEXT,
                                    descs[i + 1])
                else:
                    _DESC.pack_into(desc, 16 * descs[i], gpa, length, flags, 0)
        chain.descs = descs
        self._chains[descs[0]] = chain
        self._avail[2 + (self.next_avail & (self.size - 1))] = descs[0]
        self._fences.write()  # the entry and its descriptors before the index (spec 2.7.13)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        self._avail[1] = self.next_avail

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

    def notify(self, force=False):
        """Kick the device about chains added since the last call, if it wants kicks.

        Honours VRING_USED_F_NO_NOTIFY, or with RING_EVENT_IDX the device's
        avail_event (spec 2.7.10). Posting many chains and notifying once is
        the batch path.

        Returns:
            True when the kick eventfd was signalled.
        """
        with self._lock:
            new, old = self.next_avail, self._kicked
            self._kicked = new
            if new == old and not force:
                return False
            self._fences.full()  # avail->idx visible before we read the device's wish
            if force:
                wanted = True
            elif self._event_idx:
                wanted = _need_event(self._avail_event[0], new, old)
            else:
                wanted = not self._used[0] & _USED_F_NO_NOTIFY
        if wanted:
            self.kick.signal()
        return wanted

    # -- driver side: reaping ----------------------------------------------------

    def get_used(self, limit=None):
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
        with self._lock:
            self._check_usable()
            return self._reap(limit)

    def _reap(self, limit):
        used_idx = self._used[1]
        pending = (used_idx - self.next_used) & 0xFFFF
        if not pending:
            return []
        if pending > len(self._chains):
            self._fail("used->idx moved from %d to %d, but only %d chain(s) are in flight"
                       % (self.next_used, used_idx, len(self._chains)))
        if limit is not None:
            pending = min(pending, limit)
        self._fences.read()  # used->idx before the elements it covers
        elems = self._used_elems
        chains = self._chains
        mask = self.size - 1
        done = []
        for _ in range(pending):
            slot = 2 * (self.next_used & mask)
            head = elems[slot]
            length = elems[slot + 1]
            chain = chains.get(head)
            if chain is None:
                if head >= self.size:
                    self._fail("used entry %d names descriptor %d, the ring has %d"
                               % (self.next_used, head, self.size))
                self._fail("used entry %d names descriptor %d, which is not the head "
                           "of a chain in flight" % (self.next_used, head))
            if length > chain.writable:
                self._fail("used entry %d for descriptor %d claims %d bytes written, "
                           "the chain has %d writable" % (self.next_used, head, length,
                                                          chain.writable))
            del chains[head]
            for gpa, target in chain.copy_out:
                target[:] = self.mem.view(gpa, len(target))
            if chain.block is not None:
                self.mem.free(chain.block)
            self._free.extend(reversed(chain.descs))
            self.next_used = (self.next_used + 1) & 0xFFFF
            done.append((chain.token, length))
        return done

    def wait_used(self, timeout=5.0, count=1, spin=None):
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
        spin_until = time.monotonic() + (self.spin if spin is None else spin)
        used = self._used
        while True:
            if used[1] != self.next_used:
                done = self.get_used()
                if done:
                    return done
            now = time.monotonic()
            if now >= deadline:
                self.get_used()  # still raises for a broken ring
                return []
            if now < spin_until:
                continue
            if self._arm(count) is False:
                continue
            self.call.wait(deadline - now)

    def _arm(self, count):
        """Ask for an interrupt; False if entries were used meanwhile (re-check)."""
        with self._lock:
            self._check_usable()
            if not self._event_idx:
                return None
            want = max(1, min(count, len(self._chains)))
            self._avail[2 + self.size] = (self.next_used + want - 1) & 0xFFFF
            self._fences.full()  # used_event visible before we look at used->idx again
            return self._used[1] == self.next_used

    def _check_usable(self):
        if self._broken is not None:
            raise ProtocolError("queue %d is unusable since an earlier error: %s"
                                % (self.index, self._broken))
        if self._block is None:
            raise ValueError("queue %d is closed" % self.index)

    def _fail(self, message):
        self._broken = ProtocolError("queue %d: %s" % (self.index, message))
        raise self._broken

    def close(self):
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
            self.mem.free(self._block)
        self._chains = {}
        self._block = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "<Queue %d size=%d desc=%#x avail=%#x used=%#x next_avail=%d>" % (
            self.index, self.size, self.desc_table, self.avail_ring, self.used_ring,
            self.next_avail)


# ##########################################################################
# Backend requests #########################################################
# ##########################################################################


# ##########################################################################
# Worker ###################################################################
# ##########################################################################


# ##########################################################################
# VhostUserFrontend ########################################################
# ##########################################################################


# ##########################################################################
# Devices ##################################################################
# ##########################################################################

class _DriverFrontend:
    """The device life cycle the drivers below need, done by hand (BACKENDS.md 5).

    A stand-in with the same contract as ``VhostUserFrontend`` (constructor,
    ``features``, ``ack_features``, ``read_config``, ``queue_max_sizes``,
    ``activate``, ``close``), used until that class exists.
    """

    _client = None

    def __init__(self, device_type, base_features, connection, max_queue_size=None,
                 timeout=5.0):
        self.device_type = DeviceType(device_type)
        if isinstance(connection, BackendClient):
            client = connection
        elif isinstance(connection, socket.socket):
            client = BackendClient(connection, timeout)
        else:
            client = BackendClient.connect(connection, reply_timeout=timeout)
        self._client = client
        try:
            client.set_owner()
            offered = client.get_features()
            queues = _MIN_QUEUES[self.device_type]
            if offered & VirtioFeature.PROTOCOL_FEATURES:
                protocol = client.get_protocol_features()
                client.set_protocol_features(
                    protocol & (_P.MQ | _P.REPLY_ACK | _P.CONFIG))
                if protocol & _P.MQ:
                    queues = client.get_queue_num()
            self._avail = offered & (_DEVICE_SPECIFIC_FEATURES | int(base_features)
                                     | VirtioFeature.PROTOCOL_FEATURES)
            self._acked = 0
            size = MAX_QUEUE_SIZE if max_queue_size is None else max_queue_size
            self._max_sizes = [size] * queues
        except BaseException:
            self.close()
            raise

    @property
    def client(self):
        return self._client

    def features(self):
        return self._avail

    def ack_features(self, value):
        self._acked |= int(value) & self._avail

    def queue_max_sizes(self):
        return list(self._max_sizes)

    def read_config(self, offset, length):
        return self._client.get_config(offset, length)

    def activate(self, mem, interrupt, queues):
        del interrupt  # the driver waits on each queue's call event itself
        client = self._client
        features = self._acked
        if self._avail & VirtioFeature.PROTOCOL_FEATURES:
            features |= VirtioFeature.PROTOCOL_FEATURES
        client.set_features(features)
        client.set_mem_table(mem.regions())
        items = queues.items() if isinstance(queues, dict) else \
            ((q.index, q) for q in queues)
        for index, queue in items:
            client.set_vring_num(index, queue.size)
            client.set_vring_base(index, queue.next_avail)
            client.set_vring_addr(index, mem.host_address(queue.desc_table),
                                  mem.host_address(queue.used_ring),
                                  mem.host_address(queue.avail_ring))
            client.set_vring_call(index, queue.call)
            client.set_vring_kick(index, queue.kick)
            if features & VirtioFeature.PROTOCOL_FEATURES:
                client.set_vring_enable(index, True)

    def close(self):
        client, self._client = self._client, None
        if client is not None:
            client.close()


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
_BLK_DRIVER_FEATURES = (
    VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC | VirtioFeature.RING_EVENT_IDX
    | _BLK_F_SIZE_MAX | _BLK_F_SEG_MAX | _BLK_F_GEOMETRY | _BLK_F_RO | _BLK_F_BLK_SIZE
    | _BLK_F_FLUSH | _BLK_F_TOPOLOGY | _BLK_F_CONFIG_WCE | _BLK_F_MQ | _BLK_F_DISCARD
    | _BLK_F_WRITE_ZEROES)

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
_BLK_CONFIG = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3x")
#: Largest transfer one virtio-blk request carries; larger calls are split
#: into several requests kept in flight together.
_BLK_MAX_TRANSFER = 1 << 20


class _BlockConfig(NamedTuple):
    """struct virtio_blk_config (virtio spec 5.2.4), as the device reports it."""
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
                 "background")

    def __init__(self, op, offset, length, data, queue):
        self.op = op
        self.offset = offset
        self.length = length
        self.data = data             # read target / GET_ID buffer, or None
        self.status_buf = bytearray(1)
        self.queue = queue
        self.done = False
        self.background = False

    @property
    def status(self):
        """The virtio-blk status byte (0 OK, 1 IOERR, 2 UNSUPP), None until done."""
        return self.status_buf[0] if self.done else None

    def result(self):
        """The data read (READ, GET_ID) or None; raises ``BackendError`` for a bad status."""
        if not self.done:
            raise ValueError("%s at offset %d is still in flight"
                             % (_BLK_OP_NAMES[self.op], self.offset))
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


class _Completions:
    """Routes one queue's used entries to the threads waiting for them.

    One thread at a time reaps (waits on the call eventfd); the others wait
    on a condition variable and are woken after each reap, so no thread
    sleeps on an eventfd signal another thread already consumed.
    """

    def __init__(self, queue):
        self.queue = queue
        self.cond = threading.Condition()
        self.reaping = False
        self.finished = []    # background requests done but not yet returned

    def wait(self, until, deadline, what):
        """Reap until ``until()`` holds; VhostUserTimeout at ``deadline``."""
        with self.cond:
            while not until():
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
                    used = self.queue.wait_used(remaining)
                finally:
                    self.cond.acquire()
                    self.reaping = False
                    self.cond.notify_all()
                self._finish(used)

    def poll(self):
        with self.cond:
            if not self.reaping:
                self._finish(self.queue.get_used())

    def _finish(self, used):
        for request, _ in used:
            request.done = True
            if request.background:
                self.finished.append(request)


class BlockDevice:
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
    """

    _frontend = None
    _mem = None
    _queues = ()

    def __init__(self, frontend, num_queues=None, queue_size=128, timeout=5.0,
                 memory_size=64 << 20, max_segment_size=None):
        self._frontend = frontend
        self.timeout = timeout
        try:
            self._setup(num_queues, queue_size, memory_size, max_segment_size)
        except BaseException:
            self.close()
            raise

    @classmethod
    def connect(cls, path, num_queues=None, queue_size=128, timeout=5.0, **kwargs):
        """Connect to the vhost-user-blk socket at ``path``, negotiate and activate."""
        frontend = _DriverFrontend(DeviceType.BLOCK, _BLK_DRIVER_FEATURES, path,
                                   timeout=timeout)
        return cls(frontend, num_queues=num_queues, queue_size=queue_size,
                   timeout=timeout, **kwargs)

    def _setup(self, num_queues, queue_size, memory_size, max_segment_size):
        frontend = self._frontend
        offered = frontend.features()
        if not offered & VirtioFeature.VERSION_1:
            raise FeatureNotNegotiated("virtio-blk: the back-end does not offer VERSION_1")
        self.features = offered & _BLK_DRIVER_FEATURES
        frontend.ack_features(self.features)
        config = _BlockConfig._make(_BLK_CONFIG.unpack(
            frontend.read_config(0, _BLK_CONFIG.size)))
        self.config = config
        has = self.features.__and__
        self.block_size = config.blk_size if has(_BLK_F_BLK_SIZE) else _SECTOR
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
            queues.append(Queue(self._mem, size, index, features=self.features))
            self._queues = queues
        self._completions = [_Completions(q) for q in queues]
        frontend.activate(self._mem, None, queues)

    # -- properties from the config space ---------------------------------------

    @property
    def topology(self):
        """(physical_block_exp, alignment_offset, min_io_size, opt_io_size); None without TOPOLOGY."""
        if not self.features & _BLK_F_TOPOLOGY:
            return None
        c = self.config
        return c.physical_block_exp, c.alignment_offset, c.min_io_size, c.opt_io_size

    @property
    def writeback(self):
        """True when the device caches writes (CONFIG_WCE): call ``flush()``."""
        return bool(self.config.writeback) if self.features & _BLK_F_CONFIG_WCE else \
            bool(self.features & _BLK_F_FLUSH)

    @property
    def max_discard_sectors(self):
        """Largest DISCARD in 512-byte sectors; 0 without DISCARD."""
        return self.config.max_discard_sectors if self.features & _BLK_F_DISCARD else 0

    @property
    def max_write_zeroes_sectors(self):
        """Largest WRITE_ZEROES in 512-byte sectors; 0 without WRITE_ZEROES."""
        return self.config.max_write_zeroes_sectors \
            if self.features & _BLK_F_WRITE_ZEROES else 0

    # -- asynchronous requests ---------------------------------------------------

    def submit_read(self, offset, length, queue=0, buffer=None):
        """Start a READ of at most ``max_transfer`` bytes; returns its request.

        ``buffer`` (writable, ``length`` bytes) receives the data; by default a
        new bytearray, available as ``request.result()`` once done.
        """
        self._check_range("READ", offset, length, self.max_transfer)
        if buffer is None:
            buffer = bytearray(length)
        request = _BlockRequest(_BLK_T_IN, offset, length, buffer, queue)
        request.background = True
        self._post(request, (), self._segments(memoryview(buffer).cast("B")))
        return request

    def submit_write(self, offset, data, queue=0):
        """Start a WRITE of at most ``max_transfer`` bytes; returns its request."""
        data = memoryview(data).cast("B")
        self._check_writable("WRITE")
        self._check_range("WRITE", offset, len(data), self.max_transfer)
        request = _BlockRequest(_BLK_T_OUT, offset, len(data), None, queue)
        request.background = True
        self._post(request, self._segments(data), ())
        return request

    def submit_flush(self, queue=0):
        """Start a FLUSH; returns its request."""
        request = _BlockRequest(_BLK_T_FLUSH, 0, 0, None, queue)
        request.background = True
        self._post(request, (), ())
        return request

    def complete(self, queue=0, timeout=None, count=1):
        """Wait for requests started with ``submit_*`` on ``queue``; returns the done ones.

        Waits until at least ``count`` of them are done (or none is in flight)
        and returns every one done so far. Check each with ``result()``.

        Raises:
            VhostUserTimeout: nothing completed within ``timeout`` (default
                the device's).
        """
        completions = self._completions_for(queue)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        q = completions.queue
        completions.poll()
        completions.wait(lambda: len(completions.finished) >= count or not q.in_flight,
                         deadline, "complete")
        with completions.cond:
            done, completions.finished = completions.finished, []
        return done

    # -- simple calls ------------------------------------------------------------

    def read(self, offset, length, queue=0):
        """Read ``length`` bytes at ``offset`` (both multiples of ``block_size``)."""
        buffer = bytearray(length)
        self.readinto(offset, buffer, queue)
        return bytes(buffer)

    def readinto(self, offset, buffer, queue=0):
        """Read ``len(buffer)`` bytes at ``offset`` into ``buffer``; returns the count."""
        view = memoryview(buffer).cast("B")
        self._check_range("READ", offset, len(view), None)
        requests = []
        for start in range(0, len(view), self.max_transfer):
            piece = view[start:start + self.max_transfer]
            request = _BlockRequest(_BLK_T_IN, offset + start, len(piece), None, queue)
            requests.append(request)
            self._post(request, (), self._segments(piece), notify=False)
        self._finish(requests, "READ")
        return len(view)

    def write(self, offset, data, queue=0):
        """Write ``data`` at ``offset`` (offset and length multiples of ``block_size``)."""
        view = memoryview(data).cast("B")
        self._check_writable("WRITE")
        self._check_range("WRITE", offset, len(view), None)
        requests = []
        for start in range(0, len(view), self.max_transfer):
            piece = view[start:start + self.max_transfer]
            request = _BlockRequest(_BLK_T_OUT, offset + start, len(piece), None, queue)
            requests.append(request)
            self._post(request, self._segments(piece), (), notify=False)
        self._finish(requests, "WRITE")

    def flush(self, queue=0):
        """Make completed writes durable (FLUSH); a no-op without BLK_FLUSH."""
        if not self.features & _BLK_F_FLUSH:
            return
        request = _BlockRequest(_BLK_T_FLUSH, 0, 0, None, queue)
        self._post(request, (), ())
        self._finish([request], "FLUSH")

    def discard(self, offset, length, queue=0):
        """Tell the device ``length`` bytes at ``offset`` are unused (DISCARD)."""
        self._ranged(_BLK_T_DISCARD, _BLK_F_DISCARD, self.max_discard_sectors, offset,
                     length, 0, queue)

    def write_zeroes(self, offset, length, unmap=False, queue=0):
        """Zero ``length`` bytes at ``offset`` without sending zeroes (WRITE_ZEROES)."""
        self._ranged(_BLK_T_WRITE_ZEROES, _BLK_F_WRITE_ZEROES, self.max_write_zeroes_sectors,
                     offset, length, 1 if unmap else 0, queue)

    def get_id(self, queue=0):
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
        step = (max_sectors or 1) * _SECTOR
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

    def _segments(self, view):
        step = self._segment
        if len(view) <= step:
            return (view,)
        return [view[i:i + step] for i in range(0, len(view), step)]

    def _check_writable(self, what):
        if self.read_only:
            raise OSError(errno.EROFS, "%s: the device is read-only (VIRTIO_BLK_F_RO)" % what)

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

    def _completions_for(self, queue):
        if self._mem is None:
            raise ValueError("the block device is closed")
        if not isinstance(queue, int) or not 0 <= queue < self.num_queues:
            raise ValueError("queue %r out of range 0..%d" % (queue, self.num_queues - 1))
        return self._completions[queue]

    def _post(self, request, readable, writable, notify=True):
        """Add the request's chain, waiting for room while the ring is full.

        With ``notify=False`` the caller kicks once after posting a batch;
        chains already posted are announced before any wait for room.
        """
        completions = self._completions_for(request.queue)
        queue = completions.queue
        header = _BLK_REQ.pack(request.op, 0, request.offset // _SECTOR)
        readable = [header] + list(readable)
        writable = list(writable) + [request.status_buf]
        deadline = time.monotonic() + self.timeout
        name = _BLK_OP_NAMES[request.op]
        while True:
            try:
                queue.add(readable, writable, token=request)
                break
            except (Queue.Full, MemoryError):
                if not queue.in_flight:
                    raise
                # Reap until something of ours or anyone's completes, then retry.
                queue.notify()
                free = queue.num_free
                completions.wait(lambda: queue.num_free > free or not queue.in_flight,
                                 deadline, name)
        if notify:
            queue.notify()

    def _finish(self, requests, what):
        """Kick for the posted batch, wait for all of it, raise the first bad status."""
        if not requests:
            return
        completions = self._completions_for(requests[0].queue)
        completions.queue.notify()
        deadline = time.monotonic() + self.timeout
        completions.wait(lambda: all(r.done for r in requests), deadline, what)
        for request in requests:
            request.result()

    def close(self):
        """Disconnect from the back-end and free guest memory; safe to call twice."""
        frontend, self._frontend = self._frontend, None
        if frontend is not None:
            frontend.close()
        for queue in self._queues:
            queue.close()
        self._queues = ()
        mem, self._mem = self._mem, None
        if mem is not None:
            mem.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self._mem is None:
            return "<BlockDevice closed>"
        return "<BlockDevice capacity=%d block_size=%d queues=%d%s>" % (
            self.capacity, self.block_size, self.num_queues,
            " read-only" if self.read_only else "")


# -- virtio-net (virtio spec 5.1) ----------------------------------------------

_NET_F_MTU = 1 << 3
_NET_F_MAC = 1 << 5
_NET_F_MRG_RXBUF = 1 << 15
_NET_F_STATUS = 1 << 16
_NET_S_LINK_UP = 1
_NET_DRIVER_FEATURES = (
    VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC | VirtioFeature.RING_EVENT_IDX
    | _NET_F_MTU | _NET_F_MAC | _NET_F_MRG_RXBUF | _NET_F_STATUS)
_NET_CONFIG = struct.Struct("<6sHHH")   # mac, status, max_virtqueue_pairs, mtu
#: struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start,
#: csum_offset, then num_buffers with VERSION_1 or MRG_RXBUF (spec 5.1.6).
_NET_HDR = struct.Struct("<BBHHHHH")
_NET_HDR_LEGACY_SIZE = 10
_ETH_HLEN = 14
_NET_RX, _NET_TX = 0, 1


class NetDevice:
    """A virtio-net interface served by a vhost-user back-end (DPDK's vhost PMD, ...).

    Negotiates VERSION_1, MRG_RXBUF (unless ``mrg_rxbuf=False``) and MAC,
    MTU and STATUS when the back-end offers them (they are read from the
    config space, which needs the CONFIG protocol feature). Receive buffers
    are posted at start and reposted as frames are taken; ``send`` and
    ``send_many`` copy frames (without a virtio-net header: one is added)
    to the TX queue, ``recv`` returns one received frame without its header.
    No offloads are negotiated, so frames are plain Ethernet.

    Args:
        frontend: a connected front-end for a NET device (features not yet
            acked); the device owns and closes it.
        queue_size: ring size of the RX and TX queues.
        timeout: seconds ``send`` waits for room in a full TX queue.
        mrg_rxbuf: accept MRG_RXBUF when offered (frames may then span
            several receive buffers).
        rx_buffer_size: bytes per receive buffer, header included; by default
            big enough for one whole frame. With MRG_RXBUF it may be smaller.
    """

    _frontend = None
    _mem = None
    _queues = ()

    def __init__(self, frontend, queue_size=256, timeout=5.0, mrg_rxbuf=True,
                 rx_buffer_size=None, memory_size=None):
        self._frontend = frontend
        self.timeout = timeout
        self._rx_lock = threading.Lock()
        self._tx_lock = threading.Lock()
        self._frames = collections.deque()
        self._partial = None   # (buffers still expected, [chunks]) of a merged frame
        try:
            self._setup(queue_size, mrg_rxbuf, rx_buffer_size, memory_size)
        except BaseException:
            self.close()
            raise

    @classmethod
    def connect(cls, path, queue_size=256, timeout=5.0, **kwargs):
        """Connect to the vhost-user-net socket at ``path``, negotiate and start."""
        frontend = _DriverFrontend(DeviceType.NET, _NET_DRIVER_FEATURES, path,
                                   timeout=timeout)
        return cls(frontend, queue_size=queue_size, timeout=timeout, **kwargs)

    def _setup(self, queue_size, mrg_rxbuf, rx_buffer_size, memory_size):
        frontend = self._frontend
        offered = frontend.features()
        wanted = _NET_DRIVER_FEATURES if mrg_rxbuf else _NET_DRIVER_FEATURES & ~_NET_F_MRG_RXBUF
        self.features = offered & wanted
        frontend.ack_features(self.features)
        self.mac = self.mtu = self.link_up = None
        if self.features & (_NET_F_MAC | _NET_F_MTU | _NET_F_STATUS):
            try:
                mac, status, _, mtu = _NET_CONFIG.unpack(frontend.read_config(0, _NET_CONFIG.size))
            except FeatureNotNegotiated:
                pass  # no config space (DPDK offers no CONFIG protocol feature)
            else:
                if self.features & _NET_F_MAC:
                    self.mac = mac
                if self.features & _NET_F_MTU:
                    self.mtu = mtu
                if self.features & _NET_F_STATUS:
                    self.link_up = bool(status & _NET_S_LINK_UP)
        self._mrg = bool(self.features & _NET_F_MRG_RXBUF)
        # The header has num_buffers with VERSION_1 or MRG_RXBUF (spec 5.1.6).
        self._hdr_len = _NET_HDR.size if self.features & (
            VirtioFeature.VERSION_1 | _NET_F_MRG_RXBUF) else _NET_HDR_LEGACY_SIZE
        self._tx_hdr = bytes(self._hdr_len)
        max_sizes = frontend.queue_max_sizes()
        if len(max_sizes) < 2:
            raise ProtocolError("virtio-net: the back-end has %d queue(s), RX and TX need 2"
                                % len(max_sizes))
        size = min(queue_size, max_sizes[_NET_RX], max_sizes[_NET_TX])
        frame_max = max(self.mtu or 0, 1500) + _ETH_HLEN + 4
        if rx_buffer_size is None:
            rx_buffer_size = self._hdr_len + frame_max
        if rx_buffer_size < self._hdr_len + (1 if self._mrg else frame_max):
            raise ValueError("virtio-net: rx_buffer_size %d cannot hold %s"
                             % (rx_buffer_size, "the header" if self._mrg else
                                "a %d-byte frame and its header (MRG_RXBUF is off)"
                                % frame_max))
        self._rx_size = rx_buffer_size
        if memory_size is None:
            memory_size = 2 * size * (rx_buffer_size + self._hdr_len + frame_max) + (1 << 20)
        self._mem = GuestMemory([(0, memory_size)], name="vhost-user-net")
        self._rx_pool = self._mem.allocate(size * rx_buffer_size)
        queues = []
        for index in (_NET_RX, _NET_TX):
            queues.append(Queue(self._mem, size, index, features=self.features))
            self._queues = queues
        self._rx, self._tx = queues
        for i in range(size):
            gpa = self._rx_pool + i * rx_buffer_size
            self._rx.add(writable=[(gpa, rx_buffer_size)], token=gpa)
        frontend.activate(self._mem, None, queues)
        self._rx.notify()

    def send(self, frame):
        """Queue one Ethernet frame for transmission (copied; no header needed)."""
        self.send_many((frame,))

    def send_many(self, frames):
        """Queue frames for transmission with one kick; waits while the TX ring is full."""
        with self._tx_lock:
            tx = self._tx
            if tx is None:
                raise ValueError("the net device is closed")
            deadline = time.monotonic() + self.timeout
            for frame in frames:
                frame = bytes(frame)
                if not _ETH_HLEN <= len(frame) <= 0xFFFF - self._hdr_len:
                    raise ValueError("send: frame of %d bytes is not in %d..%d"
                                     % (len(frame), _ETH_HLEN, 0xFFFF - self._hdr_len))
                while True:
                    try:
                        tx.add((self._tx_hdr + frame,))
                        break
                    except Queue.Full:
                        tx.notify()
                        remaining = deadline - time.monotonic()
                        if not tx.wait_used(max(0.0, remaining)) and remaining <= 0:
                            raise VhostUserTimeout("send: the TX queue stayed full for %.1f s"
                                                   % self.timeout)
            tx.notify()
            tx.get_used()  # free what the device already sent

    def recv(self, timeout=None):
        """The next received frame without its virtio-net header; None after ``timeout``.

        ``timeout`` defaults to the device's; 0 polls.
        """
        with self._rx_lock:
            rx = self._rx
            if rx is None:
                raise ValueError("the net device is closed")
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            while not self._frames:
                used = rx.get_used()
                if not used:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    used = rx.wait_used(remaining)
                for gpa, length in used:
                    self._take(gpa, length)
                    rx.add(writable=[(gpa, self._rx_size)], token=gpa)
                if used:
                    rx.notify()
            return self._frames.popleft()

    def _take(self, gpa, length):
        """Account one used receive buffer: a whole frame or part of a merged one."""
        mem = self._mem
        if self._partial is None:
            if length < self._hdr_len:
                raise ProtocolError("virtio-net: a received buffer holds %d bytes, less "
                                    "than the %d-byte header" % (length, self._hdr_len))
            count = 1
            if self._mrg:
                count = _NET_HDR.unpack(mem.read(gpa, _NET_HDR.size))[6]
                if not 1 <= count <= self._rx.size:
                    raise ProtocolError("virtio-net: num_buffers %d in a received header "
                                        "is not in 1..%d" % (count, self._rx.size))
            chunks = [mem.read(gpa + self._hdr_len, length - self._hdr_len)]
        else:
            count, chunks = self._partial
            chunks.append(mem.read(gpa, length))
        count -= 1
        if count:
            self._partial = (count, chunks)
        else:
            self._partial = None
            self._frames.append(b"".join(chunks))

    def close(self):
        """Disconnect from the back-end and free guest memory; safe to call twice."""
        frontend, self._frontend = self._frontend, None
        if frontend is not None:
            frontend.close()
        for queue in self._queues:
            queue.close()
        self._queues = ()
        self._rx = self._tx = None
        mem, self._mem = self._mem, None
        if mem is not None:
            mem.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self._mem is None:
            return "<NetDevice closed>"
        return "<NetDevice mac=%s mtu=%s%s>" % (
            self.mac.hex() if self.mac else None, self.mtu,
            " mrg_rxbuf" if self._mrg else "")


# ##########################################################################
# CLI ######################################################################
# ##########################################################################
