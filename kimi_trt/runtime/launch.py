"""Process launch: who am I (rank, world, local rank), which device, and the process group.

`kimi-trt run` is started once per rank by a launcher - Open MPI's or MPICH's `mpirun`,
Slurm's `srun` - or as a single process. The launcher tells each process its place
through environment variables; we read the first complete set found, in a fixed order,
so one code path serves every launcher. Multi-node is just more ranks: MASTER_ADDR must
then name the node of rank 0 (see README "Multi-node").

The process group (torch.distributed, gloo on CPU, NCCL on GPU) is created with env://
rendezvous. Three groups are kept, each with the timeout its waits need:
- startup (the world group): rendezvous and the barrier after loading, where ranks may
  legitimately wait long for each other (weights of uneven size, slow imports);
- default: the per-layer collectives and the heartbeat's ping, with the short collective
  timeout (KIMI_TRT_COLLECTIVE_TIMEOUT, 30 s), so a hung peer becomes an error;
- control (gloo): rank 0's command broadcasts, on which idle workers wait. Its timeout
  is each process's own: rank 0's send to a worker that does not take it (stopped,
  hung) fails after the collective timeout; a worker waits CONTROL_TIMEOUT_S for the
  next command, which rank 0 sends at least every HEARTBEAT_S (a ping when idle,
  runtime/control.py), so a worker whose rank 0 went silent gives up too.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping as EnvMapping
from dataclasses import dataclass
from datetime import timedelta

import torch

from kimi_trt.errors import ConfigError

# (rank, world size, local rank, local size) variable names per launcher, most specific first.
_LAUNCHER_VARS: tuple[tuple[str, str, str, str, str], ...] = (
    (
        "Open MPI",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    ("MPICH/PMI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("Slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
)
DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29517
# Per-layer collectives: peers run the same work, so a long wait means a hung peer.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("KIMI_TRT_COLLECTIVE_TIMEOUT", "30"))
# Rank 0 pings an idle job this often, so a stuck peer is found within HEARTBEAT_S +
# COLLECTIVE_TIMEOUT_S even when no request comes.
HEARTBEAT_S = COLLECTIVE_TIMEOUT_S / 3
# Workers wait this long for rank 0's next command (it sends one every HEARTBEAT_S);
# rank 0's own sends on the control group fail after COLLECTIVE_TIMEOUT_S.
CONTROL_TIMEOUT_S = 2 * COLLECTIVE_TIMEOUT_S
# Rendezvous and the barrier after loading: ranks start and load at different speeds.
STARTUP_TIMEOUT_S = 2 * 3600.0


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job, as the launcher described it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_size: int = 1
    launcher: str = "single process"

    @property
    def is_driver(self) -> bool:
        """Rank 0 reads inputs, samples and prints; the others follow it."""
        return self.rank == 0


def _int_var(env: EnvMapping[str, str], name: str, default: int | None = None) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    head = raw.split("(")[0].split(",")[0]  # SLURM_NTASKS_PER_NODE may read "4(x2)"
    try:
        return int(head)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def detect_rank_info(env: EnvMapping[str, str] | None = None) -> RankInfo:
    """Rank, world and local rank from the first launcher whose variables are all present."""
    env = os.environ if env is None else env
    for launcher, rank_v, size_v, local_v, local_size_v in _LAUNCHER_VARS:
        rank = _int_var(env, rank_v)
        size = _int_var(env, size_v)
        if rank is None or size is None:
            continue
        local = _int_var(env, local_v, default=rank)
        local_size = _int_var(env, local_size_v, default=size)
        if not 0 <= rank < size:
            raise ConfigError(f"{launcher}: {rank_v}={rank} is outside 0..{size - 1}")
        return RankInfo(rank, size, local, local_size, launcher)
    return RankInfo()


def bind_device(info: RankInfo) -> torch.device:
    """One GPU per local rank when CUDA is present (local_rank modulo the visible GPUs), else CPU."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        index = info.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if info.local_size > 1:
        # Ranks on one host share its cores; oversubscribed intra-op threads spin-wait on
        # each other and make small matmuls ~50x slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_size))
    return torch.device("cpu")


def check_world_size(info: RankInfo, expected: int, engine_dir: str) -> None:
    """The job must have exactly as many ranks as the engine dir has rank files."""
    if info.world_size != expected:
        hint = f"mpirun -np {expected} kimi-trt run ..." if expected > 1 else "kimi-trt run ..."
        raise ConfigError(
            f"{engine_dir}: built for world size {expected} but this job has "
            f"{info.world_size} process(es) ({info.launcher}); run it as `{hint}`"
        )


# Variables every rank of one launched job shares and two concurrent jobs do not.
_JOB_ID_VARS = ("PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid", "PMI_KVSNAME", "SLURM_JOB_ID")


def default_master_port(env: EnvMapping[str, str] | None = None) -> int:
    """The rendezvous port when MASTER_PORT is unset: derived from the launcher's job id, so
    two jobs on one host (a demo beside a test run) do not collide on a fixed port; every
    rank of a job derives the same one. Without a job id: DEFAULT_MASTER_PORT."""
    env = os.environ if env is None else env
    job = "|".join(env.get(v, "") for v in _JOB_ID_VARS) + env.get("SLURM_STEP_ID", "")
    if not job.strip("|"):
        return DEFAULT_MASTER_PORT
    digest = hashlib.sha256(job.encode()).digest()
    return 29500 + int.from_bytes(digest[:4], "little") % 20000


@dataclass
class ProcessGroups:
    """The groups of the module docstring: per-layer (default), control, startup."""

    default: object | None
    control: object | None
    backend: str
    startup: object | None = None


def init_process_groups(info: RankInfo, device: torch.device) -> ProcessGroups:
    """env:// rendezvous on MASTER_ADDR:MASTER_PORT (defaults: 127.0.0.1, `default_master_port`)."""
    import torch.distributed as dist

    if info.world_size == 1:
        return ProcessGroups(None, None, "none")
    os.environ.setdefault("MASTER_ADDR", DEFAULT_MASTER_ADDR)
    os.environ.setdefault("MASTER_PORT", str(default_master_port()))
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=info.rank,
        world_size=info.world_size,
        timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
        **kwargs,
    )
    layers = dist.new_group(backend=backend, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    # Control messages are small host-side objects: always gloo, so NCCL jobs can idle too.
    wait = COLLECTIVE_TIMEOUT_S if info.rank == 0 else CONTROL_TIMEOUT_S
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait))
    return ProcessGroups(layers, control, backend, startup=dist.group.WORLD)
