"""Run a sweep: every run of a spec, each an ordinary run folder under the sweep folder.

    SWEEP/spec.yaml     the spec as given
    SWEEP/status.json   per run: state (pending, running once a worker started it, finished,
                        failed, interrupted), failed attempts, last error (written atomically)
    SWEEP/logs/<run>.log  each run's output; every start appends a "=== ... start" line
    SWEEP/<task>/<point>-s<seed>/   the run folders (config.yaml, metrics.csv, checkpoints/),
                        named with [A-Za-z0-9._-] only (dmc-walker-walk/sam_rho-0.05-s1)

Runs go to a local process pool (spawned worker processes, a torch thread budget each), or
with ``ray_address`` to Ray tasks on an existing cluster, each asking for
the spec's ``num_cpus`` / ``num_gpus``. Started again, a sweep skips finished runs, resumes
interrupted ones from their checkpoints (`flatworld.runs.train_or_resume`), and reports
runs that failed ``max_attempts`` times with the end of their log instead of retrying them.
A lock per run folder means no run is ever run by two processes at once. Started again with
another spec, a sweep folder is refused before anything is written unless the new spec only
adds runs (`check_same_runs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flatworld.experiments.spec import (
    Run,
    Spec,
    SpecError,
    check_names,
    expand,
    load_spec,
    missing,
)

OPTIMIZERS = ("adam", "sam")
FINISHED, INTERRUPTED, NEW = "finished", "interrupted", "new"


# -- the state of one run folder --------------------------------------------------------------
def run_state(run_dir: str | Path) -> str:
    """finished | interrupted | new, from the run folder alone (its newest checkpoint)."""
    import torch

    from flatworld.runs.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        return NEW
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        return INTERRUPTED
    try:  # mmap: only the small entries are read, not the replay buffer
        state = torch.load(found[-1][1], map_location="cpu", weights_only=True, mmap=True)
        return FINISHED if state.get("done") else INTERRUPTED
    except Exception:  # noqa: BLE001  (a damaged newest checkpoint: resume sorts it out)
        return INTERRUPTED


# -- status.json -----------------------------------------------------------------------------
class Status:
    """Per-run state kept by the sweep's driver (the only writer), written atomically."""

    def __init__(self, folder: Path):
        self.path = folder / "status.json"
        self.runs: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                self.runs = json.loads(self.path.read_text()).get("runs", {})
            except (json.JSONDecodeError, AttributeError):
                self.runs = {}

    def get(self, run_id: str) -> dict[str, Any]:
        return self.runs.setdefault(run_id, {"state": "pending", "attempts": 0})

    def set(self, run_id: str, **kw: Any) -> None:
        entry = self.get(run_id)
        entry.update(kw, updated=_dt.datetime.now().isoformat(timespec="seconds"))

    def save(self) -> None:
        from flatworld.runs.checkpoint import atomic_write_text

        atomic_write_text(self.path, json.dumps({"runs": self.runs}, indent=1, sort_keys=True))


# -- the job a worker runs -------------------------------------------------------------------
@dataclass
class Job:
    run_id: str
    run_dir: str
    log: str
    lock: str
    agent: str
    run_cfg: Any
    agent_cfg: Any
    threads: int | None = None
    steps: int = 0
    resources: dict[str, Any] = field(default_factory=dict)


def started_marker(job: Job) -> Path:
    """A file that exists while a worker runs the job: status.json's "running" comes from it,
    not from the pool's or Ray's queue (which holds jobs that have not started)."""
    return Path(job.lock).with_suffix(".running")


def _die_with_parent() -> None:
    """Local pool workers: the kernel kills them when the sweep process dies (even by
    SIGKILL), so an orphan never goes on writing a run folder."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _pool_init(parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides; workers just die
    # tqdm's default lock is a multiprocessing semaphore: a worker killed when the sweep is
    # stopped could not release it, and the resource tracker would report it leaked.
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def execute(job: Job) -> dict[str, Any]:
    """Train or resume one run; never raises. Output goes to the job's log file."""
    import torch

    from flatworld import runs
    from flatworld.agents import AGENTS
    from flatworld.runs.folder import LockedError, exclusive

    t0 = time.time()
    Path(job.log).parent.mkdir(parents=True, exist_ok=True)
    lock = contextlib.ExitStack()  # the run's lock, held for the whole run
    try:
        lock.enter_context(exclusive(job.lock, job.run_id))
    except LockedError:
        return {"ok": False, "permanent": False, "seconds": 0.0,
                "error": f"{job.run_id} is being run by another process (locked)"}  # fmt: skip
    marker = started_marker(job)
    marker.write_text(f"pid {os.getpid()} host {os.uname().nodename}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = open(job.log, "a")  # noqa: SIM115
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        print(f"=== {_dt.datetime.now().isoformat(timespec='seconds')} start {job.run_id} "
              f"(pid {os.getpid()}, host {os.uname().nodename})", flush=True)
        if job.threads:
            torch.set_num_threads(int(job.threads))
        try:
            runs.train_or_resume(job.run_cfg, job.agent, job.agent_cfg, agents=AGENTS,
                                 progress=False)
        except BaseException as err:  # noqa: BLE001  (reported to the driver, with its log)
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            permanent = isinstance(err, ValueError | TypeError | FileExistsError)
            return {"ok": False, "permanent": permanent, "seconds": time.time() - t0,
                    "error": f"{type(err).__name__}: {err}"}  # fmt: skip
        print(f"=== finished in {time.time() - t0:.1f} s", flush=True)
        return {"ok": True, "seconds": time.time() - t0}
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        log.close()
        marker.unlink(missing_ok=True)
        lock.close()


def log_tail(path: str | Path, lines: int = 12) -> str:
    path = Path(path)
    if not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").rstrip().splitlines()
    return "\n".join(text[-lines:])


def _steps_done(run_dir: str | Path) -> int:
    """The step of the last metrics row (read from the end of metrics.csv)."""
    path = Path(run_dir) / "metrics.csv"
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 4096))
            last = f.read().decode(errors="replace").rstrip().splitlines()[-1]
        return int(last.split(",", 1)[0])
    except (OSError, IndexError, ValueError):
        return 0


class _Stop(Exception):
    pass


def _on_signal(signum: int, frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


# -- the driver --------------------------------------------------------------------------------
@dataclass
class SweepResult:
    folder: Path
    finished: list[str]
    failed: dict[str, str]  # run_id -> error and the end of its log
    skipped: list[str]  # finished before this call
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted


def default_workers(threads: int | None) -> int:
    cores = os.cpu_count() or 1
    return max(1, cores // (threads or 1))


def prepare(spec: Spec, out: str | Path, check_device: bool = True) -> list[Run]:
    """Everything that can fail before a run starts: agents and suites installed, task ids,
    every run's config, the device."""
    check_names(spec)
    why = missing(spec)
    if why:
        raise SpecError(f"sweep {spec.name!r} cannot run here: " + "; ".join(why) +
                        " (--dry-run still prints it)")
    runs = expand(spec, Path(out), check=True)
    check_same_runs(spec, runs, Path(out))
    if check_device:
        from flatworld.runs import check_device as check

        for dev in sorted({r.run_cfg.device for r in runs}):
            try:
                check(dev)
            except ValueError as err:
                raise SpecError(f"overrides.device: {err} (with --ray the cluster's "
                                "machines are not checked here)") from None  # fmt: skip
    return runs


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    from flatworld.runs import flat_config

    return flat_config(d, prefix)


def check_same_runs(spec: Spec, runs: list[Run], out: Path) -> None:
    """A sweep folder started again with another spec: refused, naming each changed field,
    when a run that exists there would change or leave the spec; a spec that only adds runs
    (seeds, tasks, grid values) is accepted."""
    from flatworld.agents import AGENTS
    from flatworld.runs import config_differences
    from flatworld.runs.folder import resolve_episodic

    old_path = out / "spec.yaml"
    if not old_path.exists():
        return
    try:
        old_raw = yaml.safe_load(old_path.read_text())
        old_runs = expand(load_spec(old_raw, name=out.name, check=False), out, check=False)
    except (yaml.YAMLError, SpecError, ValueError, TypeError) as err:
        raise SpecError(f"{old_path} cannot be read ({err}); start the sweep in another "
                        "folder (--out)") from None
    old, new = _flat(old_raw), _flat(spec.raw)
    changed = [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
               for k in sorted(set(old) | set(new), key=str) if old.get(k) != new.get(k)]
    if not changed:
        return
    wanted = {r.run_id: r for r in runs}
    problems = []
    for r in old_runs:
        if not (out / r.run_id / "config.yaml").exists():
            continue
        if r.run_id not in wanted:
            problems.append(f"{r.run_id} would leave the spec")
            continue
        w = wanted[r.run_id]
        # as train_or_resume compares them: with the suite's `episodic` filled in
        agent_cfg = resolve_episodic(w.run_cfg.env, w.agent_cfg)
        diff = config_differences(out / r.run_id, w.run_cfg, w.agent, agent_cfg, AGENTS)
        if diff:
            problems.append(f"{r.run_id} would change ({'; '.join(diff)})")
    if problems:
        raise SpecError(f"{out} holds runs of another spec; changed: {', '.join(changed)}. "
                        f"{len(problems)} existing run(s) would not match: {problems[0]}"
                        + (f" and {len(problems) - 1} more" if len(problems) > 1 else "")
                        + "; accepted: the spec in spec.yaml, or one that only adds runs "
                        "(seeds, tasks, grid values); or use another --out")  # fmt: skip


def run_sweep(spec: Spec, out: str | Path, workers: int | None = None,
              ray_address: str | None = None, progress: bool = True,
              retry_failed: bool = False) -> SweepResult:  # fmt: skip
    """Run (or go on with) every run of `spec` in the folder `out`."""
    out = Path(out).absolute()
    runs = prepare(spec, out, check_device=ray_address is None)
    started = connect_ray(ray_address) if ray_address is not None else False
    try:
        return _run_prepared(spec, runs, out, workers, ray_address, progress, retry_failed)
    finally:
        if started:
            import ray

            ray.shutdown()


def connect_ray(address: str) -> bool:
    """Connect to the Ray cluster at `address` ('auto', 'host:port', or 'local' for a new
    local instance) unless this process already is; True when this call connected."""
    try:
        import ray
    except ImportError:
        raise SpecError("--ray needs Ray: pip install 'flatworld[ray]'") from None
    if ray.is_initialized():
        return False
    host, _, port = address.rpartition(":")
    if host and port.isdigit():  # fail now, not after Ray's long connection retries
        import socket

        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as err:
            raise SpecError(f"--ray {address}: nothing listens there ({err}); start a "
                            "cluster with `ray start --head`, or pass 'auto'") from None
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as err:
        raise SpecError(f"--ray {address}: no Ray cluster there ({err}); start one with "
                        "`ray start --head`") from None  # fmt: skip
    return True


def _run_prepared(spec: Spec, runs: list[Run], out: Path, workers: int | None,
                  ray_address: str | None, progress: bool, retry_failed: bool) -> SweepResult:
    out.mkdir(parents=True, exist_ok=True)
    from flatworld.runs.checkpoint import atomic_write_text

    atomic_write_text(out / "spec.yaml", yaml.safe_dump(spec.raw, sort_keys=False))
    threads = spec.resources.get("threads")
    if ray_address is None:
        workers = workers or default_workers(threads)
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
    else:
        threads = threads or max(1, int(spec.resources.get("num_cpus", 1)))
    jobs = [Job(r.run_id, r.run_cfg.run_dir, str(out / "logs" / f"{_flat_id(r.run_id)}.log"),
                str(out / ".locks" / f"{_flat_id(r.run_id)}.lock"), r.agent, r.run_cfg,
                r.agent_cfg, threads, r.steps,
                {"num_cpus": spec.resources.get("num_cpus", 1),
                 "num_gpus": spec.resources.get("num_gpus", 0)})
            for r in runs]  # fmt: skip
    return execute_jobs(jobs, out, spec.max_attempts, workers, ray_address, progress,
                        retry_failed)


def _flat_id(run_id: str) -> str:
    return run_id.replace("/", "__")


def execute_jobs(jobs: list[Job], out: Path, max_attempts: int = 2, workers: int | None = None,
                 ray_address: str | None = None, progress: bool = True,
                 retry_failed: bool = False) -> SweepResult:  # fmt: skip
    from tqdm import tqdm

    status = Status(out)
    skipped, finished, failed = [], [], {}
    todo: list[Job] = []
    for job in jobs:
        st = status.get(job.run_id)
        if run_state(job.run_dir) == FINISHED:
            if st.get("state") != FINISHED:
                status.set(job.run_id, state=FINISHED)
            skipped.append(job.run_id)
        elif (st.get("state") == "failed" and st.get("attempts", 0) >= max_attempts
              and not retry_failed):  # fmt: skip
            failed[job.run_id] = _failure(st, job)
        else:
            if retry_failed and st.get("state") == "failed":
                status.set(job.run_id, attempts=0)
            status.set(job.run_id, state="pending")
            started_marker(job).unlink(missing_ok=True)  # left by a worker that was killed
            todo.append(job)
    status.save()

    total = sum(j.steps for j in jobs)
    done_steps = sum(j.steps for j in jobs if j.run_id in skipped)
    bar = tqdm(total=total, initial=done_steps, unit="step", disable=not progress,
               dynamic_ncols=True, desc=out.name, file=sys.stderr)
    counts = {"done": len(skipped), "failed": len(failed), "running": 0}

    def show(running: Iterable[Job]) -> None:
        running = list(running)
        counts["running"] = len(running)
        now = done_steps + sum(min(_steps_done(j.run_dir), j.steps) for j in running)
        bar.update(max(0, now - bar.n))
        bar.set_postfix_str(f"runs {counts['done']}/{len(jobs)} done, {counts['running']} "
                            f"running, {counts['failed']} failed")  # fmt: skip

    def finish(job: Job, result: dict[str, Any]) -> bool:
        """Record a result; True when the job should be tried again."""
        nonlocal done_steps
        st = status.get(job.run_id)
        started_marker(job).unlink(missing_ok=True)  # a killed worker does not remove it
        if result.get("ok"):
            status.set(job.run_id, state=FINISHED, error="")
            finished.append(job.run_id)
            counts["done"] += 1
            done_steps += job.steps
            status.save()
            return False
        attempts = st.get("attempts", 0) + 1
        if result.get("permanent"):
            attempts = max(attempts, max_attempts)
        status.set(job.run_id, state="failed", attempts=attempts, error=result["error"])
        status.save()
        if attempts < max_attempts:
            return True
        failed[job.run_id] = _failure(status.get(job.run_id), job)
        counts["failed"] += 1
        return False

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    interrupted = False
    try:
        if ray_address is not None:
            _run_ray(todo, ray_address, status, finish, show)
        else:
            _run_local(todo, workers or default_workers(todo[0].threads if todo else 1),
                       status, finish, show)
    except (_Stop, KeyboardInterrupt) as why:
        interrupted = True
        for job in todo:
            if status.get(job.run_id).get("state") == "running":
                status.set(job.run_id, state="interrupted")
            started_marker(job).unlink(missing_ok=True)
        status.save()
        print(f"\nsweep stopped ({why or 'interrupt'}): started again, it resumes",
              file=sys.stderr)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        bar.close()
    return SweepResult(out, finished, failed, skipped, interrupted)


def _failure(st: dict[str, Any], job: Job) -> str:
    return (f"{st.get('error', '')} (after {st.get('attempts', 0)} attempt(s)); log "
            f"{job.log}:\n{log_tail(job.log)}")


def _run_local(todo: list[Job], workers: int, status: Status, finish: Any, show: Any) -> None:
    import multiprocessing as mp

    queue = list(todo)
    while queue:
        ctx = mp.get_context("spawn")
        # Workers are reused from run to run (a run seeds every generator it uses).
        pool = ProcessPoolExecutor(max_workers=min(workers, len(queue)), mp_context=ctx,
                                   initializer=_pool_init, initargs=(os.getpid(),))
        futures = {}
        retry: list[Job] = []
        try:
            for job in queue:
                futures[pool.submit(execute, job)] = job
            queue = []
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = futures[fut]
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        result = {"ok": False, "error": "the worker process died (killed, "
                                  "out of memory or crashed)"}  # fmt: skip
                    except Exception as err:  # noqa: BLE001
                        result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
                    if finish(job, result):
                        retry.append(job)
                show(mark_running(status, [futures[f] for f in pending]))
        except BaseException:
            _kill_pool(pool)
            raise
        pool.shutdown(wait=True)
        queue = retry


def mark_running(status: Status, jobs: list[Job]) -> list[Job]:
    """Jobs not done yet: "running" in status.json when a worker has started them, "pending"
    otherwise; returns the running ones."""
    running, changed = [], False
    for job in jobs:
        state = "running" if started_marker(job).exists() else "pending"
        if state == "running":
            running.append(job)
        if status.get(job.run_id).get("state") != state:
            status.set(job.run_id, state=state)
            changed = True
    if changed:
        status.save()
    return running


def _kill_pool(pool: ProcessPoolExecutor) -> None:
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)


def _run_ray(todo: list[Job], address: str, status: Status, finish: Any, show: Any) -> None:
    started = connect_ray(address)
    import ray

    task = ray.remote(execute)
    refs: dict[Any, Job] = {}

    def submit(job: Job) -> None:
        opts = {"num_cpus": job.resources.get("num_cpus", 1),
                "num_gpus": job.resources.get("num_gpus", 0), "max_retries": 0}
        refs[task.options(**opts).remote(job)] = job

    try:
        for job in todo:
            submit(job)
        status.save()
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
            for ref in ready:
                job = refs.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as err:  # noqa: BLE001  (a lost worker or node)
                    result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
                if finish(job, result):
                    submit(job)
                    status.save()
            show(mark_running(status, list(refs.values())))
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()


# -- the Python API of earlier versions ----------------------------------------------------------
def sweep(out: str | Path, agent: str, agent_cfg: Any, run_cfg: Any, seeds: list[int],
          optimizers: tuple[str, ...] = OPTIMIZERS, rho: float = 0.05, workers: int = 1,
          backend: str = "local", threads: int | None = None,
          ray_address: str | None = None) -> list[Path]:  # fmt: skip
    """Every (optimizer, seed) pair of one task into ``out/<optimizer>-s<seed>``; returns the
    folders. The same driver as `flatworld sweep` (resumable, a status file and logs in
    ``out``); a failed run raises RuntimeError with the end of its log."""
    from flatworld import optim

    bad = [o for o in optimizers if o not in OPTIMIZERS]
    if bad:
        raise ValueError(f"optimizers={bad}; accepted: {OPTIMIZERS}")
    if not seeds:
        raise ValueError("seeds=[]; accepted: one or more integer seeds")
    if backend not in ("local", "ray"):
        raise ValueError(f"backend={backend!r}; accepted: 'local', 'ray'")
    out = Path(out).absolute()
    threads = threads if threads is not None else (1 if workers > 1 else None)
    jobs = []
    for name in optimizers:
        sam = optim.SamSpec(rho=rho) if name == "sam" else None
        cfg = dataclasses.replace(agent_cfg,
                                  wm_optim=dataclasses.replace(agent_cfg.wm_optim, sam=sam))
        for seed in seeds:
            run_id = f"{name}-s{seed}"
            run = dataclasses.replace(run_cfg, seed=seed, run_dir=str(out / run_id))
            jobs.append(Job(run_id, run.run_dir, str(out / "logs" / f"{run_id}.log"),
                            str(out / ".locks" / f"{run_id}.lock"), agent, run, cfg, threads,
                            run.steps, {"num_cpus": threads or 1, "num_gpus": 0}))
    out.mkdir(parents=True, exist_ok=True)
    address = (ray_address or os.environ.get("RAY_ADDRESS") or "local") if backend == "ray" \
        else None
    result = execute_jobs(jobs, out, 1, workers, address, progress=True)
    if result.failed:
        raise RuntimeError("runs failed:\n" + "\n".join(f"{k}: {v}"
                                                        for k, v in result.failed.items()))
    if result.interrupted:
        raise KeyboardInterrupt
    return [Path(j.run_dir) for j in jobs]
