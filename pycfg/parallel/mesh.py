"""Request groups past one CFG group: ``cfg x ring x ulysses`` ranks laid out as one ``DeviceMesh``.

A world of k * (cfg * ring * ulysses) ranks serves k independent requests. Each request group is a
``DeviceMesh`` with dimensions ``("cfg", "ring", "ulysses")``: every CFG rank's branch forward runs context-parallel
(diffusers' own Ulysses / ring attention) over its ``("ring", "ulysses")`` sub-mesh, and pycfg's one collective per
step runs over ``"cfg"`` alone, between the ranks that hold the same sequence shard position.

Ranks are numbered with ulysses fastest, then ring, then cfg, then the request group: the two ranks of a Ulysses
pair are neighbours (on one host, where its all-to-alls are cheapest), and the CFG exchange, once per step, spans
the largest stride.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .groups import init_world

MESH_DIMS = ("cfg", "ring", "ulysses")


@dataclass(frozen=True)
class MeshLayout:
    """How many ranks one request uses along each mesh dimension."""

    cfg: int = 1
    ring: int = 1
    ulysses: int = 1

    def __post_init__(self) -> None:
        for name, value in (("cfg_parallel_size", self.cfg), ("ring_degree", self.ring),
                            ("ulysses_degree", self.ulysses)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def context_degree(self) -> int:
        """Ranks one branch forward is split over (the sequence is cut into this many shards)."""
        return self.ring * self.ulysses

    @property
    def size(self) -> int:
        """Ranks per request group."""
        return self.cfg * self.ring * self.ulysses

    @property
    def context_parallel(self) -> bool:
        return self.context_degree > 1

    def describe(self) -> str:
        return f"cfg {self.cfg} x ring {self.ring} x ulysses {self.ulysses}"


def check_world(layout: MeshLayout, world: int) -> None:
    """Raise unless ``world`` ranks split into whole request groups of this layout."""
    if world % layout.size:
        allowed = [w for w in range(layout.size, 4 * layout.size + 1, layout.size)]
        raise ValueError(
            f"a request group of {layout.describe()} needs {layout.size} ranks, and the world size {world} is not "
            f"a multiple of it (allowed world sizes: {', '.join(map(str, allowed))}, ...); launch "
            f"`torchrun --nproc-per-node {layout.size} app.py`"
        )


@dataclass(frozen=True)
class RequestMesh:
    """This rank's request group: its mesh and the process group of its ``"cfg"`` dimension."""

    layout: MeshLayout
    mesh: "dist.device_mesh.DeviceMesh"
    #: the ranks sharing this rank's (ring, ulysses) position: pycfg's per-step collective runs here, with
    #: pycfg's timeout
    cfg_group: dist.ProcessGroup | None
    #: every rank of this request group, with pycfg's timeout: the check that all ranks got the same call
    request_group: dist.ProcessGroup
    #: index of this rank's request group in the world, and the world ranks of the whole request group
    request_index: int
    ranks: tuple[int, ...]

    def coordinates(self) -> dict[str, int]:
        """This rank's position along each mesh dimension."""
        return {name: self.mesh.get_local_rank(name) for name in MESH_DIMS}

    def describe(self) -> dict:
        return {
            "layout": self.layout.describe(),
            "dims": dict(zip(MESH_DIMS, (self.layout.cfg, self.layout.ring, self.layout.ulysses))),
            "request_group": self.request_index,
            "ranks": list(self.ranks),
            "coordinates": self.coordinates(),
            "device_type": self.mesh.device_type,
        }


def form_request_mesh(layout: MeshLayout, *, device: torch.device, timeout: float,
                      group: dist.ProcessGroup | None = None) -> RequestMesh:
    """The request mesh this rank belongs to. Every rank of the world must call this, in the same order: mesh and
    group creation are collective over the world (torch's ``new_group`` contract).

    ``group``: the caller's process group; with a mesh it must span the whole world (a ``DeviceMesh`` creates its
    groups collectively over the world, which ranks outside a caller's sub-group would never join).
    """
    device = torch.device(device)
    init_world(layout.size, device=device, timeout=timeout, what=f"a request group of {layout.describe()}",
               check=lambda size, world: check_world(layout, world))
    world = dist.get_world_size()
    if group is not None and dist.get_world_size(group) != world:
        raise ValueError(
            f"group= has {dist.get_world_size(group)} ranks but the world has {world}: with ring_degree or "
            "ulysses_degree > 1 the request meshes are made from the whole world (DeviceMesh creates its groups "
            "collectively over it); pass no group, or the world's group"
        )
    check_world(layout, world)
    requests = world // layout.size
    shape = (requests, layout.cfg, layout.ring, layout.ulysses)
    # the CPU pipelines' meshes run on gloo ("cpu"), the CUDA ones on NCCL
    world_mesh = dist.device_mesh.init_device_mesh(device.type, shape, mesh_dim_names=("request", *MESH_DIMS))
    mesh = world_mesh[MESH_DIMS]
    ranks = torch.arange(world).view(shape)
    rank = dist.get_rank()
    request_index = rank // layout.size
    backend = "nccl" if device.type == "cuda" else "gloo"
    cfg_group = None
    if layout.cfg > 1:
        # pycfg's own cfg groups, with pycfg's timeout: every rank creates every one, in the same order
        for members in ranks.permute(0, 2, 3, 1).reshape(-1, layout.cfg).tolist():
            created = dist.new_group(members, timeout=timedelta(seconds=timeout), backend=backend)
            if rank in members:
                cfg_group = created
    request_group = None
    for members in ranks.reshape(requests, -1).tolist():
        created = dist.new_group(members, timeout=timedelta(seconds=timeout), backend=backend)
        if rank in members:
            request_group = created
    return RequestMesh(layout=layout, mesh=mesh, cfg_group=cfg_group, request_group=request_group,
                       request_index=request_index, ranks=tuple(ranks[request_index].reshape(-1).tolist()))
