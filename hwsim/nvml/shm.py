"""Shared-memory copy of the simulated GPUs, for the NVML fake running in other processes.

The physics (one writer, in the hwsim process) publishes every ``GpuState`` field each tick into a
fixed binary layout in an mmap'd file; any number of readers (the agent's NVML fake) read it with
``struct.unpack_from`` on the mapping: no syscall per read, a few microseconds per call.

Layout (little endian, every block 8-byte aligned)::

    header   128 B   magic, version, n_gpus, header seqlock, tick, sim time, writer pid, closed flag,
                     XID ring count and capacity, record size, block offsets
    records  n_gpus x RECORD_SIZE   per GPU: u64 seqlock, numeric fields, fixed-size strings
    requests n_gpus x 16 B          per GPU: u64 seqlock/counter, f64 requested watts (written by
                                    readers: nvmlDeviceSetPowerManagementLimit)
    xid ring XID_CAP x 16 B         u64 pod seq, u32 gpu index, u32 xid

Torn reads are prevented by seqlocks: the writer makes the record's sequence odd, writes, then
makes it even again; a reader retries while the sequence is odd or changed under it. A limit
request is acknowledged by the writer in the GPU record (``limit_req_ack``), so a reader can tell
a pending request from an applied one (the fake reports a pending limit at once, as real NVML
reports a new limit at once).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple, Protocol

from hwsim.state import GpuState, PodState

MAGIC = b"HWSNVML\x00"
VERSION = 2  # 2: power_avg_w (1 s average) beside power_w (instantaneous); power smoothing
XID_CAP = 1024  # XID ring entries; a reader that falls further behind loses the oldest
HEADER_SIZE = 128

# Header: magic, version, n_gpus, hdr_seq, tick, sim_time, writer_pid, closed, xid_count,
# xid_cap, record_size, records_off, requests_off, xid_off.
_HEADER = struct.Struct("<8sIIQQdIIQIIIII")
_HDR_SEQ_OFF = 16
_HDR_CLOSED_OFF = 44
_HDR_XID_COUNT_OFF = 48
_U64 = struct.Struct("<Q")


def _store_u64(mm: mmap.mmap, off: int, value: int) -> None:
    """One 8-byte store. Not ``struct.pack_into``: CPython's packer first zero-fills the target,
    so a seqlock counter would read as 0 (even: "consistent") for a moment mid-write; a reader
    that hit two such moments took a torn record (seen once in ~10^6 reads across processes)."""
    mm[off : off + 8] = _U64.pack(value)


_U32 = struct.Struct("<I")


class GpuNumbers(NamedTuple):
    """The numeric part of one GPU record, as read (field names follow ``GpuState``)."""

    index: int
    server: int
    lost: int
    clocks_event_reasons: int
    mem_total_bytes: int
    mem_used_bytes: int
    ecc_corrected: int
    ecc_uncorrected: int
    limit_req_ack: int  # the last power-limit request counter the physics has taken
    default_limit_w: float
    min_limit_w: float
    max_limit_w: float
    power_limit_w: float
    enforced_limit_w: float
    power_w: float
    power_avg_w: float
    temp_c: float
    energy_j: float
    util_gpu_pct: float
    util_mem_pct: float
    clock_sm_mhz: float
    clock_mem_mhz: float
    clock_sm_max_mhz: float
    clock_mem_max_mhz: float
    temp_shutdown_c: float
    temp_slowdown_c: float
    temp_max_operating_c: float
    temp_mem_max_c: float


class GpuStrings(NamedTuple):
    uuid: str
    name: str
    pci_bus_id: str
    serial: str
    loop: str


# Numeric part: I i I(lost) + 6 Q (incl. padding-free order) + 19 d. Sizes chosen from nvml.h
# buffer sizes: UUID 96, name 96, PCI bus id 32, serial 30 (rounded to 32).
_NUMBERS = struct.Struct("<IiI" + "4x" + "Q" * 6 + "d" * 19)
_STRING_SIZES = (96, 96, 32, 32, 64)
_STRINGS = struct.Struct("<" + "".join(f"{n}s" for n in _STRING_SIZES))
_NUM_OFF = 8  # after the record's u64 seqlock
_STR_OFF = _NUM_OFF + _NUMBERS.size
RECORD_SIZE = (_STR_OFF + _STRINGS.size + 7) // 8 * 8
_REQ = struct.Struct("<Qd")
_XID = struct.Struct("<QII")
_REQ_SPINS = 1000
# Power smoothing (Blackwell-class): per GPU a state block (seqlock, supported, enabled, active
# profile, lifetime %, the applied floor % / ramp up / ramp down W/s / hysteresis ms, then
# SMOOTHING_PROFILES x SMOOTHING_PARAMS preset values as NVML numbers them) and a request slot
# (seqlock, op, profile, param, value) the fake writes and the physics takes at its next tick.
SMOOTHING_PROFILES = 5  # NVML_POWER_SMOOTHING_MAX_NUM_PROFILES
SMOOTHING_PARAMS = 8  # NVML_POWER_SMOOTHING_NUM_PROFILE_PARAMS
SMOOTH_OP_SET_STATE, SMOOTH_OP_ACTIVATE, SMOOTH_OP_UPDATE_PARAM = 1, 2, 3
# Not an NVML call: the software fallback's filler floor (value W; any GPU model), which a node
# runs as low-priority burn work beside the job. The fake's ``podagentSetFillerFloor`` queues it.
SMOOTH_OP_FILLER_FLOOR = 4
# Workload power profiles (nvmlDeviceWorkloadPowerProfileSet/ClearRequestedProfiles): value = the
# profile bit mask (profiles 0..24 fit in the u32 the state block carries where it had padding).
SMOOTH_OP_WORKLOAD_SET, SMOOTH_OP_WORKLOAD_CLEAR = 5, 6
# After a u64 seqlock: the request counter taken, supported, enabled, profile, the requested
# workload power profiles' mask (was padding: same size, older readers see 0), then the doubles.
_SMOOTH = struct.Struct("<QIIII" + "d" * (5 + SMOOTHING_PROFILES * SMOOTHING_PARAMS))
_SMOOTH_SIZE = 8 + _SMOOTH.size
_SREQ = struct.Struct("<QIII4xd")


class SmoothingNumbers(NamedTuple):
    taken: int  # the last request counter the physics has taken
    supported: bool
    enabled: bool
    profile: int
    lifetime_pct: float
    floor_pct: float
    ramp_up_w_per_s: float
    ramp_down_w_per_s: float
    hysteresis_ms: float
    presets: tuple[tuple[float, ...], ...]  # [profile][param]
    workload_mask: int = 0  # requested workload power profiles (bit i: NVML_POWER_PROFILE id i)


class SmoothingSource(Protocol):
    """What the writer publishes per GPU (hwsim.state.GpuSmoothingState has these)."""

    supported: bool
    enabled: bool
    profile: int
    lifetime_pct: float
    floor_pct: float
    ramp_up_w_per_s: float
    ramp_down_w_per_s: float
    hysteresis_ms: float
    presets: list[list[float]]
    workload_mask: int


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0  # "no limit" (inf) travels as 0


# Every GpuState field must travel (a field the lead adds to GpuState must be added here too).
SHM_FIELDS = frozenset(GpuNumbers._fields) | frozenset(GpuStrings._fields)
assert {f.name for f in fields(GpuState)} <= SHM_FIELDS, "GpuState field missing from the shm layout"


def _layout(n_gpus: int) -> tuple[int, int, int, int]:
    records = HEADER_SIZE
    requests = records + n_gpus * RECORD_SIZE
    xids = requests + n_gpus * _REQ.size
    size = xids + XID_CAP * _XID.size + n_gpus * (_SMOOTH_SIZE + _SREQ.size)
    return records, requests, xids, size


def _smooth_offsets(n_gpus: int, xids: int) -> tuple[int, int]:
    """(smoothing state blocks, smoothing request slots): after the XID ring."""
    smooth = xids + XID_CAP * _XID.size
    return smooth, smooth + n_gpus * _SMOOTH_SIZE


class NvmlShmWriter:
    """The physics' side: creates the file, publishes each tick, picks up limit requests."""

    def __init__(self, path: Path, n_gpus: int) -> None:
        self.path = Path(path)
        self.n_gpus = n_gpus
        self._rec_off, self._req_off, self._xid_off, size = _layout(n_gpus)
        self._smooth_off, self._sreq_off = _smooth_offsets(n_gpus, self._xid_off)
        self._smooth_taken = [0] * n_gpus
        self._tick = 0
        self._xid_count = 0
        self._last_xid_seq = -1
        self._taken = [0] * n_gpus  # last request counter taken per GPU
        self._str_cache: dict[int, tuple[tuple[str, ...], tuple[bytes, ...]]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Build the file under a temporary name and rename it: a reader never maps a half-made file.
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.fchmod(fd, 0o666)  # readers write power-limit requests (the fake checks root itself)
            os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        _HEADER.pack_into(
            self._mm, 0, MAGIC, VERSION, n_gpus, 0, 0, 0.0, os.getpid(), 0, 0, XID_CAP,
            RECORD_SIZE, self._rec_off, self._req_off, self._xid_off,
        )  # fmt: skip
        os.replace(tmp, self.path)
        self._ino = os.stat(self.path).st_ino

    def publish(self, pod: PodState, smoothing: Sequence[SmoothingSource] | None = None) -> None:
        """Write every GPU record, the header and the XID events newer than the last publish;
        with ``smoothing`` (the physics' per-GPU power smoothing), its state blocks too."""
        mm = self._mm
        if smoothing is not None:
            for i, sm in enumerate(smoothing[: self.n_gpus]):
                off = self._smooth_off + i * _SMOOTH_SIZE
                seq = _U64.unpack_from(mm, off)[0]
                _store_u64(mm, off, seq + 1)
                flat = [_finite(v) for row in sm.presets[:SMOOTHING_PROFILES] for v in row[:SMOOTHING_PARAMS]]
                flat += [0.0] * (SMOOTHING_PROFILES * SMOOTHING_PARAMS - len(flat))
                _SMOOTH.pack_into(
                    mm, off + 8, self._smooth_taken[i], int(sm.supported), int(sm.enabled), sm.profile,
                    sm.workload_mask & 0xFFFFFFFF, sm.lifetime_pct,
                    _finite(sm.floor_pct), _finite(sm.ramp_up_w_per_s), _finite(sm.ramp_down_w_per_s),
                    sm.hysteresis_ms, *flat,
                )  # fmt: skip
                _store_u64(mm, off, seq + 2)
        for gpu in pod.gpus:
            if not 0 <= gpu.index < self.n_gpus:
                raise ValueError(f"GPU index {gpu.index} outside this file's {self.n_gpus} GPUs")
            off = self._rec_off + gpu.index * RECORD_SIZE
            seq = _U64.unpack_from(mm, off)[0]
            _store_u64(mm, off, seq + 1)  # odd: writing
            _NUMBERS.pack_into(
                mm, off + _NUM_OFF, gpu.index, gpu.server, int(gpu.lost), gpu.clocks_event_reasons,
                gpu.mem_total_bytes, gpu.mem_used_bytes, gpu.ecc_corrected, gpu.ecc_uncorrected,
                self._taken[gpu.index], gpu.default_limit_w, gpu.min_limit_w, gpu.max_limit_w,
                gpu.power_limit_w, gpu.enforced_limit_w, gpu.power_w, gpu.power_avg_w, gpu.temp_c,
                gpu.energy_j,
                gpu.util_gpu_pct, gpu.util_mem_pct, gpu.clock_sm_mhz, gpu.clock_mem_mhz,
                gpu.clock_sm_max_mhz, gpu.clock_mem_max_mhz, gpu.temp_shutdown_c, gpu.temp_slowdown_c,
                gpu.temp_max_operating_c, gpu.temp_mem_max_c,
            )  # fmt: skip
            _STRINGS.pack_into(mm, off + _STR_OFF, *self._strings(gpu))
            _store_u64(mm, off, seq + 2)  # even: consistent
        # XID events by pod seq; the entry is written before the count that makes it visible.
        for ev in pod.xid_events:
            if ev.seq <= self._last_xid_seq:
                continue
            slot = self._xid_count % XID_CAP
            _XID.pack_into(mm, self._xid_off + slot * _XID.size, ev.seq, ev.gpu_index, ev.xid)
            self._xid_count += 1
            self._last_xid_seq = ev.seq
            _store_u64(mm, _HDR_XID_COUNT_OFF, self._xid_count)
        self._tick += 1
        hseq = _U64.unpack_from(mm, _HDR_SEQ_OFF)[0]
        _store_u64(mm, _HDR_SEQ_OFF, hseq + 1)
        _store_u64(mm, _HDR_SEQ_OFF + 8, self._tick)
        struct.pack_into("<d", mm, _HDR_SEQ_OFF + 16, pod.sim_time_s)
        _store_u64(mm, _HDR_SEQ_OFF, hseq + 2)

    def _strings(self, gpu: GpuState) -> tuple[bytes, ...]:
        key = (gpu.uuid, gpu.name, gpu.pci_bus_id, gpu.serial, gpu.loop)
        cached = self._str_cache.get(gpu.index)
        if cached is None or cached[0] != key:
            enc = tuple(s.encode()[: n - 1] for s, n in zip(key, _STRING_SIZES, strict=True))
            cached = (key, enc)
            self._str_cache[gpu.index] = cached
        return cached[1]

    def take_limit_requests(self) -> list[tuple[int, float]]:
        """(gpu index, requested watts) for every request made since the last call."""
        out: list[tuple[int, float]] = []
        mm = self._mm
        for i in range(self.n_gpus):
            off = self._req_off + i * _REQ.size
            for _ in range(_REQ_SPINS):
                seq, watts = _REQ.unpack_from(mm, off)
                if not seq & 1 and _U64.unpack_from(mm, off)[0] == seq:
                    break
                time.sleep(0)  # a requester is writing this very slot (microseconds)
            else:
                continue  # a requester died mid-write; the slot stays odd until the next request
            if seq != self._taken[i]:
                self._taken[i] = seq
                out.append((i, watts))
        return out

    def take_smoothing_requests(self) -> list[tuple[int, int, int, int, float]]:
        """(gpu index, op, profile, param, value) of every smoothing request since the last call
        (one slot per GPU: the latest request wins, as the fake writes one per call)."""
        out: list[tuple[int, int, int, int, float]] = []
        mm = self._mm
        for i in range(self.n_gpus):
            off = self._sreq_off + i * _SREQ.size
            for _ in range(_REQ_SPINS):
                seq, op, profile, param, value = _SREQ.unpack_from(mm, off)
                if not seq & 1 and _U64.unpack_from(mm, off)[0] == seq:
                    break
                time.sleep(0)
            else:
                continue
            if seq != self._smooth_taken[i]:
                self._smooth_taken[i] = seq
                out.append((i, op, profile, param, value))
        return out

    def close(self) -> None:
        """Mark the file closed (mapped readers see it), unmap it and remove it."""
        if self._mm.closed:
            return
        _U32.pack_into(self._mm, _HDR_CLOSED_OFF, 1)
        self._mm.close()
        # Remove it only if it is still ours (a new pod may have replaced it already).
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._ino:
                self.path.unlink()


class ShmClosedError(Exception):
    """The writer is gone: closed the file or died."""


class NvmlShmReader:
    """The fake's side: maps the file and reads records with seqlock retries."""

    LIVENESS_EVERY_S = 1.0  # how often to check that the writer process still exists

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDWR)
            writable = True
        except PermissionError:
            fd = os.open(self.path, os.O_RDONLY)
            writable = False
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise ValueError(f"{path}: too short for an hwsim NVML state file")
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._mm = mmap.mmap(fd, size, access=access)
        finally:
            os.close(fd)
        self.writable = writable
        hdr = _HEADER.unpack_from(self._mm, 0)
        magic, version, n_gpus = hdr[0], hdr[1], hdr[2]
        if magic != MAGIC or version != VERSION:
            self._mm.close()
            raise ValueError(f"{path}: not an hwsim NVML state file (magic {magic!r}, version {version})")
        self.n_gpus: int = n_gpus
        self.writer_pid: int = hdr[6]
        self._rec_off, self._req_off, self._xid_off, expect = _layout(n_gpus)
        self._smooth_off, self._sreq_off = _smooth_offsets(n_gpus, self._xid_off)
        if size < expect or hdr[10] != RECORD_SIZE:
            self._mm.close()
            raise ValueError(f"{path}: layout mismatch (size {size}, expected {expect})")
        self._next_liveness = 0.0

    # -- liveness ----------------------------------------------------------------------------
    def alive(self) -> bool:
        """False once the writer closed the file or its process is gone."""
        if self._mm.closed or _U32.unpack_from(self._mm, _HDR_CLOSED_OFF)[0]:
            return False
        try:
            os.kill(self.writer_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, owned by another user
        return True

    def check(self) -> None:
        """Raise ShmClosedError if the writer is gone; the process check runs at most once a second."""
        if _U32.unpack_from(self._mm, _HDR_CLOSED_OFF)[0]:
            raise ShmClosedError(str(self.path))
        now = time.monotonic()
        if now >= self._next_liveness:
            self._next_liveness = now + self.LIVENESS_EVERY_S
            if not self.alive():
                raise ShmClosedError(str(self.path))

    def _spin(self, spins: int) -> int:
        """Back off while the writer holds a record; give up if it died in the middle."""
        spins += 1
        if spins > 8:
            time.sleep(0)  # let an in-process writer thread run (GIL) / yield the CPU
        if spins % 10_000 == 0 and not self.alive():
            raise ShmClosedError(str(self.path))
        return spins

    # -- reads -------------------------------------------------------------------------------
    def numbers(self, index: int) -> GpuNumbers:
        mm, off = self._mm, self._rec_off + index * RECORD_SIZE
        unpack_seq, unpack = _U64.unpack_from, _NUMBERS.unpack_from
        spins = 0
        while True:
            seq = unpack_seq(mm, off)[0]
            if not seq & 1:
                vals = unpack(mm, off + _NUM_OFF)
                if unpack_seq(mm, off)[0] == seq:
                    return GpuNumbers._make(vals)
            spins = self._spin(spins)

    def strings(self, index: int) -> GpuStrings:
        mm, off = self._mm, self._rec_off + index * RECORD_SIZE
        spins = 0
        while True:
            seq = _U64.unpack_from(mm, off)[0]
            if not seq & 1:
                vals = _STRINGS.unpack_from(mm, off + _STR_OFF)
                if _U64.unpack_from(mm, off)[0] == seq:
                    return GpuStrings._make(v.rstrip(b"\x00").decode() for v in vals)
            spins = self._spin(spins)

    def header(self) -> tuple[int, float]:
        """(tick, sim time s) of the last publish."""
        spins = 0
        while True:
            seq = _U64.unpack_from(self._mm, _HDR_SEQ_OFF)[0]
            if not seq & 1:
                tick, sim_time = struct.unpack_from("<Qd", self._mm, _HDR_SEQ_OFF + 8)
                if _U64.unpack_from(self._mm, _HDR_SEQ_OFF)[0] == seq:
                    return tick, sim_time
            spins = self._spin(spins)

    # -- power-limit requests ----------------------------------------------------------------
    def request(self, index: int) -> tuple[int, float]:
        """(request counter, watts) of the latest power-limit request for a GPU (0 = none yet)."""
        off = self._req_off + index * _REQ.size
        for _ in range(_REQ_SPINS):
            seq, watts = _REQ.unpack_from(self._mm, off)
            if not seq & 1 and _U64.unpack_from(self._mm, off)[0] == seq:
                return seq, watts
            time.sleep(0)
        return seq & ~1, watts  # a requester died mid-write: its watts are whatever it left

    def request_limit(self, index: int, watts: float) -> int:
        """Write a power-limit request for the physics' next tick; returns its counter."""
        if not self.writable:
            raise PermissionError(f"{self.path}: read-only")
        off = self._req_off + index * _REQ.size
        seq = _U64.unpack_from(self._mm, off)[0] & ~1
        _store_u64(self._mm, off, seq + 1)
        struct.pack_into("<d", self._mm, off + 8, watts)
        _store_u64(self._mm, off, seq + 2)
        return seq + 2

    # -- power smoothing ---------------------------------------------------------------------
    def smoothing(self, index: int) -> SmoothingNumbers:
        mm, off = self._mm, self._smooth_off + index * _SMOOTH_SIZE
        spins = 0
        while True:
            seq = _U64.unpack_from(mm, off)[0]
            if not seq & 1:
                v = _SMOOTH.unpack_from(mm, off + 8)
                if _U64.unpack_from(mm, off)[0] == seq:
                    flat = v[10:]
                    presets = tuple(
                        tuple(flat[p * SMOOTHING_PARAMS : (p + 1) * SMOOTHING_PARAMS])
                        for p in range(SMOOTHING_PROFILES)
                    )
                    return SmoothingNumbers(v[0], bool(v[1]), bool(v[2]), v[3], *v[5:10], presets, v[4])
            spins = self._spin(spins)

    def smoothing_request_seq(self, index: int) -> int:
        """The counter of the GPU's latest smoothing request (0: none yet)."""
        return int(_U64.unpack_from(self._mm, self._sreq_off + index * _SREQ.size)[0]) & ~1

    def request_smoothing(self, index: int, op: int, profile: int, param: int, value: float) -> int:
        """Write a smoothing request for the physics' next tick; returns its counter."""
        if not self.writable:
            raise PermissionError(f"{self.path}: read-only")
        off = self._sreq_off + index * _SREQ.size
        seq = _U64.unpack_from(self._mm, off)[0] & ~1
        _store_u64(self._mm, off, seq + 1)
        struct.pack_into("<III4xd", self._mm, off + 8, op, profile, param, value)
        _store_u64(self._mm, off, seq + 2)
        return seq + 2

    # -- XID ring ----------------------------------------------------------------------------
    def xid_count(self) -> int:
        """How many XID events were ever published (the ring's write cursor)."""
        return int(_U64.unpack_from(self._mm, _HDR_XID_COUNT_OFF)[0])

    def xid_events(self, cursor: int) -> tuple[list[tuple[int, int, int]], int]:
        """Events (pod seq, gpu index, xid) from ``cursor`` on, and the new cursor.

        A reader more than XID_CAP events behind loses the oldest (as a real event queue overflows).
        """
        count = self.xid_count()
        if count <= cursor:
            return [], cursor
        cursor = max(cursor, count - XID_CAP)
        out = [
            _XID.unpack_from(self._mm, self._xid_off + (n % XID_CAP) * _XID.size)
            for n in range(cursor, count)
        ]
        # The writer may have lapped the oldest entries while we copied them: drop those.
        lapped = self.xid_count() - XID_CAP - cursor
        if lapped > 0:
            out = out[lapped:]
        return out, count

    def close(self) -> None:
        if not self._mm.closed:
            self._mm.close()


__all__ = [
    "RECORD_SIZE",
    "SHM_FIELDS",
    "XID_CAP",
    "GpuNumbers",
    "GpuStrings",
    "NvmlShmReader",
    "NvmlShmWriter",
]
