"""All-reduce and all-gather through shared memory, for the tensor-parallel ranks of one host.

A replica's shards always share a node (Ray places them with STRICT_PACK), yet gloo carries every CPU
collective through the loopback TCP stack: on the 2-core dev machine an all-reduce of 256 floats between
two processes takes ~0.5 ms, and a decode step makes 14 of them. Here every rank maps one segment in
/dev/shm; a collective copies the rank's tensor into its slot, raises its flag and spins until all flags
are up, then each rank reads every slot itself (~20 µs: bench/collectives_cpu.py). All ranks add the
slots in rank order, so they hold bit-identical sums.

Two sets of slots are used in turn (one sequence number per call). A rank writes a set again only two
calls later, when every peer has raised its flag for the call in between, which a peer does only after
it has read the set. That reasoning needs a flag to become visible after the slot written before it,
which x86's store order (TSO) gives; on other architectures `join` returns None and gloo is used.
Tensors larger than a slot go through in slot-sized pieces; tensors off the CPU through the process group.
"""

from __future__ import annotations

import os
import platform
import socket
import time
import uuid
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_SLOT_BYTES = 2 << 20  # a decode step's [batch, hidden] fp32 partials, or a 2k-token prefill chunk of the small preset
_HEADER_BYTES = 4096  # flags [2, size] and pids [size], int64; the slots start cache-line aligned after it
_MAX_RANKS = _HEADER_BYTES // 8 // 3
_SHM_DIR = "/dev/shm"
_SPINS_BEFORE_YIELD = 200  # a peer on another core usually arrives within a few µs of spinning
_CHECK_EVERY_S = 0.05  # how often a waiting rank checks its peers are alive and the deadline


def _host_id() -> str:
    """Same string on two processes iff they can share a /dev/shm segment (same machine and boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _alive(pid: int) -> bool:
    """False once pid has exited (a zombie counts as exited: its parent may not have reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


class SharedMemoryGroup:
    """The collectives of one torch.distributed group whose ranks run on one host.

    Build it with `join`, on every rank of `pg`, after the process group is up."""

    def __init__(self, pg: Any, rank: int, size: int, storage: torch.Tensor, slot_bytes: int, timeout_s: float) -> None:
        self.pg = pg
        self.rank = rank
        self.size = size
        self.slot_bytes = slot_bytes
        self.timeout_s = timeout_s
        header = storage[:_HEADER_BYTES].view(torch.int64)
        # numpy views of the header: a spinning rank reads its peers' flags at ~100 ns, not a torch op's µs.
        self._flags = header[: 2 * size].view(2, size).numpy()
        self._pids = header[2 * size : 3 * size].numpy()
        self._slots = storage[_HEADER_BYTES : _HEADER_BYTES + 2 * size * slot_bytes].view(2, size, slot_bytes)
        self._seq = 0

    @classmethod
    def join(cls, pg: Any, rank: int, size: int, timeout_s: float = 120.0,
             slot_bytes: int = DEFAULT_SLOT_BYTES, host_id: str | None = None) -> "SharedMemoryGroup | None":
        """Map one segment on every rank of pg (a collective: call it on all of them). Returns None on every
        rank, and the caller keeps using pg, when the ranks are on different hosts (host_id: this rank's
        host; default hostname + boot id), the CPU is not x86, or /dev/shm cannot hold the segment."""
        if size < 2 or size > _MAX_RANKS:
            return None
        if slot_bytes < 64 or slot_bytes % 64:
            raise ValueError(f"slot_bytes must be a positive multiple of 64, got {slot_bytes}")
        hosts: list[Any] = [None] * size
        dist.all_gather_object(hosts, host_id or _host_id(), group=pg)
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        if len(set(hosts)) != 1 or not x86:
            return None
        total = _HEADER_BYTES + 2 * size * slot_bytes
        path = None
        if rank == 0:
            path = os.path.join(_SHM_DIR, f"agent-swarm-tp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    # Reserve the pages now: a full /dev/shm fails here (and the group keeps gloo), not as a
                    # SIGBUS on some later write into a sparse file.
                    os.posix_fallocate(fd, 0, total)
                finally:
                    os.close(fd)
            except OSError:
                if os.path.exists(path):
                    os.unlink(path)
                path = None
        box = [path]
        dist.broadcast_object_list(box, src=dist.get_global_rank(pg, 0) if pg is not None else 0, group=pg)
        path = box[0]
        storage = None
        if path is not None:
            try:
                storage = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
            except (OSError, RuntimeError):
                storage = None
        mapped: list[Any] = [None] * size
        dist.all_gather_object(mapped, storage is not None, group=pg)  # also: every rank has mapped it by now
        if rank == 0 and path is not None:
            os.unlink(path)  # the mappings keep the memory; nothing is left behind if a rank crashes later
        if not all(mapped):
            return None
        group = cls(pg, rank, size, storage, slot_bytes, timeout_s)  # type: ignore[arg-type]
        group._pids[rank] = os.getpid()
        dist.barrier(group=pg)  # every pid is written before anyone waits on it
        return group

    def handles(self, x: torch.Tensor) -> bool:
        """CPU tensors go through shared memory (in slot-sized pieces if need be), others through pg."""
        return x.device.type == "cpu"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the group, in place; returns x."""
        if not self.handles(x):
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.pg)
            return x
        flat = x.view(-1) if x.is_contiguous() else x.reshape(-1).clone()
        for piece in self._pieces(flat):
            slots = self._exchange(piece)
            # Added in rank order with plain adds (a bf16 torch.sum over the slots is 6x slower), the
            # same order on every rank.
            torch.add(slots[0], slots[1], out=piece)
            for r in range(2, self.size):
                piece.add_(slots[r])
        if not x.is_contiguous():
            x.copy_(flat.view(x.shape))
        return x

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x (same shape on all), in rank order; fresh tensors."""
        if not self.handles(x):
            parts = [torch.empty_like(x) for _ in range(self.size)]
            dist.all_gather(parts, x.contiguous(), group=self.pg)
            return parts
        flat = x.reshape(-1)
        out = [torch.empty(flat.numel(), dtype=x.dtype) for _ in range(self.size)]
        start = 0
        for piece in self._pieces(flat):
            slots = self._exchange(piece)
            for r in range(self.size):
                out[r][start : start + piece.numel()].copy_(slots[r])
            start += piece.numel()
        return [o.view(x.shape) for o in out]

    def _pieces(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """flat in views of at most a slot each (every rank cuts the same pieces: same shape, same slot)."""
        per = max(1, self.slot_bytes // flat.element_size())
        return [flat[i : i + per] for i in range(0, max(flat.numel(), 1), per)] if flat.numel() else []

    def _exchange(self, x: torch.Tensor) -> torch.Tensor:
        """Publish x in this rank's slot and wait for all the others: [size, numel] views of the slots,
        valid until this rank's next call but one."""
        self._seq += 1
        seq, par = self._seq, self._seq % 2
        nbytes = x.numel() * x.element_size()
        slots = self._slots[par, :, :nbytes].view(x.dtype)
        slots[self.rank].copy_(x.reshape(-1))
        self._flags[par, self.rank] = seq
        self._wait(par, seq)
        return slots

    def _wait(self, par: int, seq: int) -> None:
        flags = self._flags[par]
        spins = 0
        next_check = deadline = 0.0
        while (flags != seq).any():
            spins += 1
            if spins < _SPINS_BEFORE_YIELD:
                continue
            os.sched_yield()  # a 2-core host may need this core for the peer we wait on
            now = time.monotonic()
            if not deadline:
                deadline, next_check = now + self.timeout_s, now + _CHECK_EVERY_S
            elif now >= next_check:
                next_check = now + _CHECK_EVERY_S
                missing = [r for r in range(self.size) if flags[r] != seq]
                dead = [r for r in missing if not _alive(int(self._pids[r]))]
                if dead:
                    raise RuntimeError(
                        f"tensor-parallel rank(s) {dead} of {self.size} exited during a shared-memory collective "
                        f"(pid {[int(self._pids[r]) for r in dead]})")
                if now >= deadline:
                    raise RuntimeError(
                        f"tensor-parallel rank(s) {missing} of {self.size} did not reach shared-memory collective "
                        f"#{seq} within {self.timeout_s:.0f} s")
