"""What a rank does when something goes wrong: say it once, exit non-zero, never hang.

The rank where the error happened prints one line naming itself and the cause, then
leaves with `os._exit` - no interpreter shutdown, so no destructor can block on a
half-finished collective. Its sockets close, so every peer waiting on it in a collective
gets an error at once (or, for a peer that hung, the collective timeout fires); those
errors arrive as `PeerFailure` and are "someone else's failure": workers exit quietly,
rank 0 adds one line saying it lost contact (useful when the failing rank was killed
and could print nothing). mpirun/srun also terminate the job when a rank exits non-zero.

Errors every rank detects identically before doing any rank-specific work (a missing
config.json, a world-size mismatch) are printed by rank 0 only.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable

from kimi_trt.errors import MissingCapability, UserError
from kimi_trt.runtime.comm import PeerFailure
from kimi_trt.runtime.launch import detect_rank_info

# Give the failing rank's own message a head start over rank 0's "lost contact" line.
_PEER_MESSAGE_DELAY_S = 0.5


def shared(error: UserError) -> UserError:
    """Mark a user error as the job's, not one rank's (config, world size, inputs): rank 0
    reports it once, without a rank prefix. Returns the same exception, type unchanged."""
    error.shared = True
    return error


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _say(line: str) -> None:
    sys.stderr.write(line.rstrip() + "\n")
    sys.stderr.flush()


def run_rank(main: Callable[[], int], rank: int, world_size: int) -> int:
    """Run this rank's `main`; on failure report per the rules above and exit the process.

    In a world of one every exception is re-raised: the CLI reports it as for any command.
    A multi-rank process leaves with `os._exit` on success too (after flushing): interpreter
    teardown of the collective library's threads can abort ("terminate called without an
    active exception") after the work is done, turning a good run into a failed job.
    """
    if world_size == 1:
        return main()
    try:
        _exit_now(main())
    except PeerFailure as e:
        if rank == 0:
            time.sleep(_PEER_MESSAGE_DELAY_S)
            _say(f"error: rank 0: lost contact with another rank ({e}); stopping")
        _exit_now(1)
    except (UserError, MissingCapability) as e:
        is_shared = getattr(e, "shared", False)
        if rank == 0 or not is_shared:
            _say(f"error: {'' if is_shared else f'rank {rank}: '}{e}")
        _exit_now(e.exit_code)
    except MemoryError:
        _say(f"error: rank {rank}: out of host memory")
        _exit_now(1)
    except KeyboardInterrupt:
        _exit_now(130)
    except Exception as e:  # an internal error: one line first, the traceback after it
        _say(f"error: rank {rank}: internal error: {type(e).__name__}: {e}")
        if os.environ.get("KIMI_TRT_TRACEBACK"):
            traceback.print_exc()
        _exit_now(1)
    return 1


def run_this_rank(main: Callable[[], int]) -> int:
    """`run_rank` with this process's rank and world size (from the launcher's environment)."""
    info = detect_rank_info()
    return run_rank(main, info.rank, info.world_size)
