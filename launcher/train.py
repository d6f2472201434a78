#!/usr/bin/env python
"""Train with fewstep: `deepspeed launcher/train.py --config configs/demo/flow.json [--key value ...]`.

Also runs under `torchrun`, Slurm's `srun` (RANK/WORLD_SIZE/LOCAL_RANK, or SLURM_PROCID/SLURM_LOCALID) and plain
`python` (one process). Command-line `--key value` pairs override the JSON file; `--help` lists every option.

A mistake the user can fix (config, data, paths, model source, a busy output_dir, a resume that does not fit, a
diverged run) ends in one `fewstep: ...` line on rank 0 (and on the rank where it started, see `report`) and exit
status 2 (1 for a diverged run); FEWSTEP_DEBUG=1 shows the traceback instead. A run stopped by a preemption signal
(SIGUSR1/SIGTERM: checkpoint written) exits 0, or FEWSTEP_PREEMPTED_EXIT where that is set (slurm/common.sh: 75);
one stopped by Ctrl-C exits 130, after the checkpoint (a second Ctrl-C: at once, without one).
"""
import os
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its import-time notices (torchvision) are not for our users

from fewstep import preemption  # noqa: E402

preemption.install()  # first: a SIGUSR1/SIGTERM during imports, model load or engine set-up must not kill the task

from fewstep.config import describe_options, load_config  # noqa: E402
from fewstep.errors import UserError, exit_status  # noqa: E402


def parse_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """--config PATH (or --config=PATH), dropping the deepspeed launcher's --local_rank; the rest are overrides."""
    config, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--local_rank") or a.startswith("--local-rank"):  # passed by the deepspeed launcher
            i += 1 if "=" in a else 2
            continue
        if a == "--config" or a.startswith("--config="):
            if a == "--config" and i + 1 >= len(argv):
                raise UserError("--config needs a path")
            given, i = (argv[i + 1], i + 2) if a == "--config" else (a.split("=", 1)[1], i + 1)
            if config is not None:  # which one was meant is not guessed (the last one used to win)
                raise UserError(f"--config is given twice ({config} and {given}): give one config file, and "
                                "override its options with --key value")
            config = given
            continue
        rest.append(a)
        i += 1
    return config, rest


PAUSE_BEFORE_EXIT_S = 2.0


def report(error: BaseException, first: bool) -> None:
    """The error as one `fewstep: ...` line on stderr.

    Rank 0 prints every failure: its own, or the one another rank announced (`RankFailed`). The rank where a failure
    started (`first`) prints it too, as `fewstep: rank N: ...`: `srun --kill-on-bad-exit` may stop rank 0 before it
    learns of it. Before the ranks have met (the config, the launch) every rank usually has the same error, so
    the others pause to let rank 0 print first, and then only the first rank of each node prints its own (a file
    missing from one node's disk); the rest pause longer, so that their exit does not end a printing rank early.
    After they have met, rank 0 does not repeat its own error when another rank met the same one first and printed
    it (a data or resume mistake every rank finds at once).
    """
    from fewstep.engine.distributed import RankFailed, first_failure

    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", "0")))
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))
    if rank == 0 and not first and not isinstance(error, RankFailed):
        kept = first_failure() or ""  # every rank met the same mistake and another was first: it printed this line
        if not kept.startswith("rank 0 ") and kept.endswith(f"{type(error).__name__}: {error}"):
            return
    if rank == 0 or first:
        print(f"fewstep: {'' if rank == 0 else f'rank {rank}: '}{error}", file=sys.stderr, flush=True)
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        time.sleep(PAUSE_BEFORE_EXIT_S * (1 if local == 0 else 2))
        if local == 0:
            print(f"fewstep: rank {rank}: {error}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(describe_options())
        return 0
    from fewstep.engine.distributed import RankFailed, announce_failure, teardown

    first = False  # this rank's failure is the first of the job
    try:
        config, rest = parse_argv(argv)
        if config is None and not rest:
            raise UserError("--config PATH is required (a JSON config such as configs/demo/flow.json); --help lists "
                            "every option")
        cfg = load_config(config, rest)
        from fewstep.trainer import train

        try:
            result = train(cfg)
        except BaseException as e:  # ranks waiting for this one stop with its message instead of waiting for ever
            first = announce_failure(e)
            raise
    except (UserError, RankFailed) as e:
        if os.environ.get("FEWSTEP_DEBUG") == "1":
            raise
        report(e, first)
        return exit_status(e)
    except KeyboardInterrupt:  # a second Ctrl-C
        if os.environ.get("FEWSTEP_DEBUG") == "1":
            raise
        report(UserError("interrupted (Ctrl-C twice): stopped at once, without a checkpoint; resume_from_checkpoint "
                         "latest continues from the last one saved (a run that saved none starts again)"), first=False)
        return preemption.INTERRUPTED_EXIT
    teardown()
    if not result.get("preempted"):
        return 0
    if result.get("signal") == "SIGINT":  # Ctrl-C, checkpoint written: a user's stop, never requeued
        return preemption.INTERRUPTED_EXIT
    # stopped by a preemption signal, checkpoint written: slurm/common.sh asks for a status of its own (75), to
    # requeue only such a run (not one that finished, nor one that failed)
    return int(os.environ.get("FEWSTEP_PREEMPTED_EXIT") or 0)


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except SystemExit:
        raise
    except BaseException as unexpected:  # a bug, CUDA out of memory, an NCCL error: its traceback, then leave as a
        import traceback  # mistake does (rank 0 last: it may host the store the other ranks still talk to)

        traceback.print_exc()
        code = preemption.INTERRUPTED_EXIT if isinstance(unexpected, KeyboardInterrupt) else 1
    if code:  # after a failure the process group is still up (tearing it down could wait on ranks that are gone),
        sys.stdout.flush()  # and gloo's threads can abort the interpreter's exit ("terminate called without an
        sys.stderr.flush()  # active exception", status -6): leave at once with the status the error gave
        from fewstep.engine.distributed import leave_after_failure

        leave_after_failure()  # rank 0 may host the rendezvous store: it leaves last
        os._exit(code)
    sys.exit(code)
