"""Start a real `tritonserver` on this machine: the binary nvidia-pytriton bundles.

Why the bundled binary: it runs on CPU-only hosts (tests, CPU users) with the Python
backend, which is all a torch-executor repository needs; GPU deployments use NVIDIA's
Triton container with the same repository. What it needs (environment.md):
- LD_LIBRARY_PATH with the interpreter's LIBDIR (the Python stub links libpython3.x);
- a backend directory `python/` holding the wheel's libtriton_python.so,
  triton_python_backend_utils.py and the stub built for this Python version.

Multi-rank engines run in leader mode, as tensorrtllm_backend's launch script does: one
process per rank under one `mpirun`, rank 0 serves. For TensorRT-LLM engines every rank is
a tritonserver (ranks > 0 load only `tensorrt_llm`, whose backend blocks them as
workers); for torch-executor engines rank 0 is the tritonserver (its `kimi` model drives
the engine) and ranks > 0 run `kimi-trt triton-worker`, our runtime's worker loop.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kimi_trt.errors import MissingCapability, UserError

STUB_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pytriton_root() -> Path:
    """The folder of the tritonserver build inside the nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError:
        raise MissingCapability(
            "tritonserver needs nvidia-pytriton: pip install 'kimi_trt[serve]'"
        ) from None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise MissingCapability(f"{root}: nvidia-pytriton has no bundled tritonserver binary")
    return root


def tritonserver_binary() -> Path:
    return pytriton_root() / "bin" / "tritonserver"


def python_backend_dir(cache: Path | None = None) -> Path:
    """A backend directory with `python/` linked to the wheel's Python backend (made once)."""
    root = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise MissingCapability(f"{stub}: no Triton Python stub for Python {version}")
    base = cache or Path(tempfile.gettempdir()) / f"kimi_trt_triton_backends_{os.getuid()}"
    target = base / "python"
    target.mkdir(parents=True, exist_ok=True)
    sources = {name: root / "backends" / "python" / name for name in STUB_FILES}
    sources[stub.name] = stub
    for name, source in sources.items():
        link = target / name
        if link.is_symlink() and link.resolve() == source.resolve():
            continue
        link.unlink(missing_ok=True)
        try:
            link.symlink_to(source)
        except FileExistsError:  # another process made it at the same moment
            if link.resolve() != source.resolve():
                raise
    return base


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver and its Python stubs."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p
    )
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it if we die (Linux), so no server is orphaned."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: stop() and the context manager still apply
        pass


@dataclass
class ServerPorts:
    http: int = field(default_factory=free_port)
    grpc: int = field(default_factory=free_port)
    metrics: int = field(default_factory=free_port)


def tritonserver_args(
    repo: Path | list[Path],
    ports: ServerPorts,
    host: str = "127.0.0.1",
    backend_dir: Path | None = None,
    load_only: list[str] | None = None,
    rank: int = 0,
) -> list[str]:
    """One tritonserver command line (binary included); several repositories may be given."""
    repos = repo if isinstance(repo, list) else [repo]
    args = [
        str(tritonserver_binary()),
        *(f"--model-repository={Path(r).resolve()}" for r in repos),
        f"--backend-directory={backend_dir or python_backend_dir()}",
        f"--http-address={host}",
        f"--grpc-address={host}",
        f"--metrics-address={host}",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        "--disable-auto-complete-config",
        "--exit-timeout-secs=10",
        f"--backend-config=python,shm-region-prefix-name=kimi{os.getpid()}r{rank}_",
    ]
    if load_only:
        args += ["--model-control-mode=explicit"] + [f"--load-model={m}" for m in load_only]
    return args


def mpirun_binary() -> str:
    local = Path(sys.executable).parent / "mpirun"
    found = str(local) if local.is_file() else shutil.which("mpirun")
    if not found:
        raise MissingCapability("multi-rank serving needs mpirun: pip install 'kimi_trt[mpi]'")
    return found


def leader_mode_command(
    repo: Path, engine_dir: Path, world: int, kind: str, ports: ServerPorts, host: str
) -> list[str]:
    """`mpirun` MPMD command: rank 0 serves, ranks 1..world-1 follow (see module docstring)."""
    cmd = [mpirun_binary(), "--oversubscribe", "-x", "LD_LIBRARY_PATH"]
    cmd += ["-x", "MASTER_ADDR", "-x", "MASTER_PORT", "-x", "PATH"]
    cmd += ["-np", "1", *tritonserver_args(repo, ports, host)]
    for rank in range(1, world):
        if kind == "trtllm":
            follower = tritonserver_args(repo, ports, host, load_only=["tensorrt_llm"], rank=rank)
        else:
            follower = [sys.executable, "-m", "kimi_trt.cli", "triton-worker", "--engine-dir"]
            follower.append(str(Path(engine_dir).resolve()))
        cmd += [":", "-np", "1", *follower]
    return cmd


class TritonServer:
    """A tritonserver process (or leader-mode mpirun job) on 127.0.0.1; a context manager."""

    def __init__(
        self,
        repo: str | Path,
        engine_dir: str | Path | None = None,
        world_size: int = 1,
        engine_kind: str = "torch",
        host: str = "127.0.0.1",
        ports: ServerPorts | None = None,
        log_file: str | Path | None = None,
        extra_repos: tuple[str | Path, ...] = (),
        load_only: list[str] | None = None,
    ):
        self.repo = Path(repo)
        for r in (self.repo, *map(Path, extra_repos)):
            if not r.is_dir():
                raise UserError(f"{r}: model repository not found")
        self.host = host
        self.ports = ports or ServerPorts()
        if world_size > 1:
            if engine_dir is None:
                raise UserError("a multi-rank engine needs engine_dir for the worker ranks")
            self.command = leader_mode_command(
                self.repo, Path(engine_dir), world_size, engine_kind, self.ports, host
            )
        else:
            repos = [self.repo, *map(Path, extra_repos)]
            self.command = tritonserver_args(repos, self.ports, host, load_only=load_only)
        self.log_file = Path(log_file) if log_file else None
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports.metrics}/metrics"

    def start(self, timeout: float = 120.0) -> TritonServer:
        env = server_env()
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env["MASTER_PORT"] = str(free_port())
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            self.command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.wait_ready(timeout)
        return self

    def ready(self) -> bool:
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited with code {self.process.returncode} before it was ready"
                    + (f"; see {self.log_file}" if self.log_file else "")
                )
            if self.ready():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s")

    def wait(self) -> int:
        return self.process.wait()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (tritonserver and mpirun shut down cleanly), then SIGKILL its group."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
