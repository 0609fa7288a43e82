"""The NCCL extension (``pycfg._nccl``) as a pycfg communicator, plus torch custom ops over it.

``NcclComm`` has TorchComm's interface and adds a weighted all-reduce (NCCL's PreMulSum, each rank's weight read
from device memory when the collective runs) and grouped multi-tensor calls (one NCCL group, one launch). Every
call is enqueued on the caller's current CUDA stream without synchronising the host, so it can be captured in a
CUDA graph and replayed with new weights.

The extension is optional: :func:`unavailable_reason` says why it cannot be used (not built, no libnccl, NCCL
too old), and ``make_comm`` then falls back to torch.distributed.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..errors import RankFailureError

NAME = "nccl-ext"

# NCCL's ncclDataType_t codes
NCCL_DTYPES = {
    torch.int8: 0,
    torch.uint8: 1,
    torch.int32: 2,
    torch.int64: 4,
    torch.float16: 6,
    torch.float32: 7,
    torch.float64: 8,
    torch.bfloat16: 9,
}
for _name, _code in (("uint32", 3), ("uint64", 5)):
    if hasattr(torch, _name):
        NCCL_DTYPES[getattr(torch, _name)] = _code

# kinds of group members understood by the extension's Communicator.group
_SUM, _WEIGHTED, _GATHER = 0, 1, 2


def library_path() -> str:
    """The libnccl that will be opened: ``PYCFG_NCCL_LIBRARY``, else ``libnccl.so.2`` (torch's own once loaded)."""
    return os.environ.get("PYCFG_NCCL_LIBRARY") or "libnccl.so.2"


@functools.lru_cache(maxsize=None)
def _load(path: str):
    """(extension module, NCCL version code) or (None, reason)."""
    try:
        from .. import _nccl
    except ImportError as err:
        return None, (
            f"pycfg was installed without its C++ extension pycfg._nccl ({err}); it is built by `pip install` when "
            "a C++17 compiler, CMake and pybind11 are present (PYCFG_NO_EXT=1 skips it on purpose)"
        )
    try:
        version = _nccl.load(path)
    except _nccl.NcclError as err:
        return None, f"NCCL is unavailable: {err}"
    return _nccl, version


def unavailable_reason() -> str | None:
    """Why the NCCL extension cannot be used in this process, or None when it can."""
    ext, info = _load(library_path())
    return info if ext is None else None


def available() -> bool:
    return unavailable_reason() is None


def version() -> tuple[int, int, int] | None:
    """NCCL's (major, minor, patch) as loaded by the extension, or None."""
    ext, code = _load(library_path())
    if ext is None:
        return None
    if code >= 10000:
        return code // 10000, code % 10000 // 100, code % 100
    return code // 1000, code % 1000 // 100, code % 100  # the scheme before NCCL 2.9


def extension():
    """The loaded extension module; raises RuntimeError saying why when it cannot be used."""
    ext, info = _load(library_path())
    if ext is None:
        raise RuntimeError(f"comm='nccl-ext' cannot be used: {info}")
    return ext


def _raw_stream_getter():
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if getter is not None:
        return getter
    return lambda index: torch.cuda.current_stream(index).cuda_stream


_LIVE: "weakref.WeakValueDictionary[int, NcclComm]" = weakref.WeakValueDictionary()
_next_handle = 0


class NcclComm:
    """A NCCL communicator over the ranks of ``group`` (or a 1-rank one with ``group=None``), on ``device``.

    Rank 0's ncclUniqueId travels through the group itself (``broadcast_object_list``), so it works on gloo and
    NCCL groups alike. ``timeout`` bounds initialisation and any wait for an unfinished collective; then the
    communicator is aborted and :class:`RankFailureError` raised.
    """

    name = NAME

    def __init__(self, group: dist.ProcessGroup | None, *, device: torch.device | str, timeout: float = 600.0,
                 blocking: bool | None = None) -> None:
        global _next_handle
        ext = extension()
        self.group = group
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"the NCCL communicator needs a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._index = self.device.index
        self.timeout = float(timeout)
        self.calls = 0
        if group is None:
            self.rank, self.size = 0, 1
        else:
            self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        if blocking is None:
            blocking = os.environ.get("PYCFG_NCCL_BLOCKING", "0") == "1"
        self._ext = ext
        self._stream = _raw_stream_getter()
        with torch.cuda.device(self._index):
            unique = [ext.unique_id() if self.rank == 0 else None]
            if group is not None:
                dist.broadcast_object_list(unique, src=dist.get_global_rank(group, 0), group=group)
            self._comm = self._call(ext.Communicator, unique[0], self.size, self.rank, blocking, self.timeout)
        self.handle = _next_handle
        _next_handle += 1
        _LIVE[self.handle] = self

    # -- errors --------------------------------------------------------------------------------------------------

    def _failure(self, err: Exception) -> Exception:
        code = getattr(err, "code", None)
        if code in (self._ext.TIMEOUT, self._ext.SYSTEM_ERROR, self._ext.REMOTE_ERROR):
            failure = RankFailureError(
                f"NCCL collective across the CFG group (rank {self.rank} of {self.size}) failed: a peer rank "
                f"failed, died or did not reach the same point within timeout={self.timeout:g}s. Cause: {err}"
            )
            failure.nccl_code = code
            return failure
        return err

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self._ext.NcclError as err:
            raise self._failure(err) from err

    # -- checks --------------------------------------------------------------------------------------------------

    def _code(self, t: torch.Tensor) -> int:
        if not t.is_cuda or t.get_device() != self._index:
            raise ValueError(f"NCCL communicator on {self.device} got a tensor on {t.device}")
        if not t.is_contiguous():
            raise ValueError("NCCL collectives need contiguous tensors")
        try:
            return NCCL_DTYPES[t.dtype]
        except KeyError:
            raise TypeError(f"NCCL has no data type for {t.dtype}") from None

    def _weight_ptr(self, weight: torch.Tensor, dtype: torch.dtype) -> int:
        if weight.dtype != dtype or weight.numel() != 1:
            raise ValueError(
                f"the weight must be a one-element tensor of the data's dtype {dtype} (NCCL's PreMulSum scalar has "
                f"the data's type), got {weight.dtype} with {weight.numel()} elements"
            )
        self._code(weight)
        return weight.data_ptr()

    # -- eager collectives (what the custom ops run) -------------------------------------------------------------

    def _all_reduce(self, flat: torch.Tensor) -> None:
        ptr = flat.data_ptr()
        self._call(self._comm.all_reduce, ptr, ptr, flat.numel(), self._code(flat), 0, self._stream(self._index))

    def _weighted_all_reduce(self, flat: torch.Tensor, weight: torch.Tensor) -> None:
        ptr = flat.data_ptr()
        code = self._code(flat)
        self._call(self._comm.weighted_all_reduce, ptr, ptr, flat.numel(), code, self._weight_ptr(weight, flat.dtype),
                   self._stream(self._index))

    def _all_gather_into(self, out: torch.Tensor, flat: torch.Tensor) -> None:
        if out.numel() != flat.numel() * self.size or out.dtype != flat.dtype:
            raise ValueError(f"all_gather output must hold {self.size} x {flat.numel()} {flat.dtype} elements")
        self._code(out)
        self._call(self._comm.all_gather, flat.data_ptr(), out.data_ptr(), flat.numel(), self._code(flat),
                   self._stream(self._index))

    def _group(self, entries: list) -> None:
        self._call(self._comm.group, entries, self._stream(self._index))

    def _reduce_many(self, flats: Sequence[torch.Tensor], weights: Optional[Sequence[torch.Tensor]]) -> None:
        if weights is not None and len(weights) != len(flats):
            raise ValueError(f"{len(flats)} tensors but {len(weights)} weights")
        entries = []
        for j, flat in enumerate(flats):
            ptr = flat.data_ptr()
            code = self._code(flat)
            if weights is None:
                entries.append((_SUM, ptr, ptr, flat.numel(), code, 0))
            else:
                entries.append((_WEIGHTED, ptr, ptr, flat.numel(), code, self._weight_ptr(weights[j], flat.dtype)))
        self._group(entries)

    def _gather_many(self, outs: Sequence[torch.Tensor], flats: Sequence[torch.Tensor]) -> None:
        entries = []
        for out, flat in zip(outs, flats, strict=True):
            if out.numel() != flat.numel() * self.size or out.dtype != flat.dtype:
                raise ValueError(f"all_gather output must hold {self.size} x {flat.numel()} {flat.dtype} elements")
            self._code(out)
            entries.append((_GATHER, flat.data_ptr(), out.data_ptr(), flat.numel(), self._code(flat), 0))
        self._group(entries)

    # -- the communicator interface ------------------------------------------------------------------------------

    def all_gather(self, flat: torch.Tensor, count: bool = True) -> torch.Tensor:
        """Every rank's ``flat`` stacked into (size, numel); all inputs must have the same numel.

        ``count=False`` marks debug traffic (consistency checks) that is not part of the per-step exchange.
        """
        self.calls += count
        flat = flat.reshape(-1)
        if torch.compiler.is_compiling():
            return torch.ops.pycfg_nccl.all_gather(flat, self.handle)
        out = torch.empty((self.size, flat.numel()), dtype=flat.dtype, device=flat.device)
        self._all_gather_into(out, flat)
        return out

    def all_gather_into(self, out: torch.Tensor, flat: torch.Tensor, count: bool = True) -> torch.Tensor:
        """All-gather into a preallocated (size, numel) ``out`` (what a captured graph reuses)."""
        self.calls += count
        if torch.compiler.is_compiling():
            torch.ops.pycfg_nccl.all_gather_into_(out, flat, self.handle)
        else:
            self._all_gather_into(out, flat)
        return out

    def all_reduce_(self, flat: torch.Tensor, count: bool = True) -> torch.Tensor:
        """Element-wise sum over ranks, in place."""
        self.calls += count
        if torch.compiler.is_compiling():
            torch.ops.pycfg_nccl.all_reduce_(flat, self.handle)
        else:
            self._all_reduce(flat)
        return flat

    def weighted_all_reduce_(self, flat: torch.Tensor, weight: torch.Tensor | float,
                             count: bool = True) -> torch.Tensor:
        """In place: sum over ranks of (each rank's own ``weight`` * its ``flat``).

        ``weight`` is a one-element device tensor of ``flat``'s dtype, read when the collective runs (so a CUDA
        graph replays with its current value). A Python float is copied to the device first: not capturable.
        Half-precision data means a half-precision weight and sum; reduce fp32 copies for fp32 accumulation.
        """
        self.calls += count
        if not isinstance(weight, torch.Tensor):
            weight = torch.tensor([float(weight)], dtype=flat.dtype, device=self.device)
        if torch.compiler.is_compiling():
            torch.ops.pycfg_nccl.weighted_all_reduce_(flat, weight, self.handle)
        else:
            self._weighted_all_reduce(flat, weight)
        return flat

    def all_reduce_many_(self, flats: Sequence[torch.Tensor], weights: Sequence[torch.Tensor] | None = None,
                         count: bool = True) -> list[torch.Tensor]:
        """Sum (or, with one weight tensor per entry, weighted sum) of several tensors in one NCCL group call."""
        self.calls += count
        flats = list(flats)
        weights = None if weights is None else list(weights)
        if torch.compiler.is_compiling():
            torch.ops.pycfg_nccl.all_reduce_many_(flats, weights or [], self.handle)
        else:
            self._reduce_many(flats, weights)
        return flats

    def all_gather_many(self, flats: Sequence[torch.Tensor], count: bool = True) -> list[torch.Tensor]:
        """All-gather of several tensors (any dtypes and sizes) in one NCCL group call; each out is (size, numel)."""
        self.calls += count
        flats = [f.reshape(-1) for f in flats]
        if torch.compiler.is_compiling():
            return list(torch.ops.pycfg_nccl.all_gather_many(flats, self.handle))
        outs = [torch.empty((self.size, f.numel()), dtype=f.dtype, device=f.device) for f in flats]
        self._gather_many(outs, flats)
        return outs

    # -- lifetime ------------------------------------------------------------------------------------------------

    def synchronize(self) -> None:
        """Wait (under the timeout) until this communicator's eagerly enqueued collectives have finished; raises
        :class:`RankFailureError` instead of hanging when a peer died. Graph replays are not tracked."""
        self._call(self._comm.synchronize)

    def check(self) -> None:
        """Raise if NCCL reports an asynchronous error; never blocks."""
        self._call(self._comm.check_async)

    def abort(self) -> None:
        self._comm.abort()

    def close(self) -> None:
        """Finish outstanding work and free the NCCL communicator (idempotent)."""
        _LIVE.pop(self.handle, None)
        self._call(self._comm.close)

    @property
    def blocking(self) -> bool:
        return self._comm.blocking

    def describe(self) -> dict:
        ext, code = _load(library_path())
        return {"name": self.name, "rank": self.rank, "size": self.size, "device": str(self.device),
                "nccl_version": ".".join(map(str, version())), "library": library_path(), "blocking": self.blocking,
                "timeout": self.timeout}

    def __repr__(self) -> str:
        return f"NcclComm(rank={self.rank}, size={self.size}, device={self.device})"


def _comm(handle: int) -> NcclComm:
    try:
        return _LIVE[handle]
    except KeyError:
        raise RuntimeError(f"NCCL communicator {handle} is closed or was never created") from None


# -- torch custom ops: what torch.compile and graph capture see ------------------------------------------------


@torch.library.custom_op("pycfg_nccl::all_reduce_", mutates_args=("flat",))
def _op_all_reduce_(flat: torch.Tensor, handle: int) -> None:
    _comm(handle)._all_reduce(flat)


@_op_all_reduce_.register_fake
def _(flat, handle):
    return None


@torch.library.custom_op("pycfg_nccl::weighted_all_reduce_", mutates_args=("flat",))
def _op_weighted_all_reduce_(flat: torch.Tensor, weight: torch.Tensor, handle: int) -> None:
    _comm(handle)._weighted_all_reduce(flat, weight)


@_op_weighted_all_reduce_.register_fake
def _(flat, weight, handle):
    return None


@torch.library.custom_op("pycfg_nccl::all_reduce_many_", mutates_args=("flats",))
def _op_all_reduce_many_(flats: list[torch.Tensor], weights: list[torch.Tensor], handle: int) -> None:
    # an empty weight list means a plain sum (custom ops take no optional lists)
    _comm(handle)._reduce_many(flats, weights or None)


@_op_all_reduce_many_.register_fake
def _(flats, weights, handle):
    return None


@torch.library.custom_op("pycfg_nccl::all_gather_into_", mutates_args=("out",))
def _op_all_gather_into_(out: torch.Tensor, flat: torch.Tensor, handle: int) -> None:
    _comm(handle)._all_gather_into(out, flat)


@_op_all_gather_into_.register_fake
def _(out, flat, handle):
    return None


def _group_size(handle: int) -> int:
    comm = _LIVE.get(handle)
    return comm.size if comm is not None else 1


@torch.library.custom_op("pycfg_nccl::all_gather", mutates_args=())
def _op_all_gather(flat: torch.Tensor, handle: int) -> torch.Tensor:
    comm = _comm(handle)
    out = torch.empty((comm.size, flat.numel()), dtype=flat.dtype, device=flat.device)
    comm._all_gather_into(out, flat.contiguous())
    return out


@_op_all_gather.register_fake
def _(flat, handle):
    return flat.new_empty((_group_size(handle), flat.numel()))


@torch.library.custom_op("pycfg_nccl::all_gather_many", mutates_args=())
def _op_all_gather_many(flats: list[torch.Tensor], handle: int) -> list[torch.Tensor]:
    comm = _comm(handle)
    flats = [f.contiguous() for f in flats]
    outs = [torch.empty((comm.size, f.numel()), dtype=f.dtype, device=f.device) for f in flats]
    comm._gather_many(outs, flats)
    return outs


@_op_all_gather_many.register_fake
def _(flats, handle):
    return [f.new_empty((_group_size(handle), f.numel())) for f in flats]
