"""Seeds x world-model optimizers on one task: a folder of runs.

Locally the runs go one after another (or in a process pool); with ``backend="ray"``
Ray schedules the same runs on a cluster. Each run is an ordinary run folder, so a
sweep that is killed resumes run by run.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from flatworld import optim

OPTIMIZERS = ("adam", "sam")


def run_job(job: dict[str, Any]) -> str:
    import torch

    from flatworld import runs

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    run_dir = Path(job["run"].run_dir)
    if (run_dir / "config.yaml").exists():
        return str(runs.resume(run_dir, progress=job["progress"]))
    return str(runs.train(job["run"], job["agent"], job["agent_cfg"], progress=job["progress"]))


def jobs(out: Path, agent: str, agent_cfg: Any, run_cfg: Any, seeds: list[int],
         optimizers: list[str], rho: float, progress: bool = True) -> list[dict[str, Any]]:
    bad = [o for o in optimizers if o not in OPTIMIZERS]
    if bad:
        raise ValueError(f"optimizers={bad}; accepted: {OPTIMIZERS}")
    if not seeds:
        raise ValueError("seeds=[]; accepted: one or more integer seeds")
    out_jobs = []
    for name in optimizers:
        sam = optim.SamSpec(rho=rho) if name == "sam" else None
        cfg = dataclasses.replace(agent_cfg,
                                  wm_optim=dataclasses.replace(agent_cfg.wm_optim, sam=sam))
        for seed in seeds:
            run = dataclasses.replace(run_cfg, seed=seed, run_dir=str(out / f"{name}-s{seed}"))
            out_jobs.append({"run": run, "agent": agent, "agent_cfg": cfg, "progress": progress})
    return out_jobs


def sweep(out: str | Path, agent: str, agent_cfg: Any, run_cfg: Any, seeds: list[int],
          optimizers: tuple[str, ...] = OPTIMIZERS, rho: float = 0.05, workers: int = 1,
          backend: str = "local", threads: int | None = None) -> list[Path]:
    """Run every (optimizer, seed) pair into ``out/<optimizer>-s<seed>``; returns the folders.

    With several local workers each run gets one torch thread unless ``threads`` says
    otherwise: runs side by side on a small machine are slower with more threads each.
    """
    out = Path(out)
    todo = jobs(out, agent, agent_cfg, run_cfg, seeds, list(optimizers), rho,
                progress=workers == 1 and backend == "local")
    for job in todo:
        job["threads"] = threads if threads is not None else (1 if workers > 1 else None)
    if backend == "ray":
        import ray

        ray.init(ignore_reinit_error=True)
        remote = ray.remote(num_cpus=1)(run_job)
        return [Path(p) for p in ray.get([remote.remote(j) for j in todo])]
    if backend != "local":
        raise ValueError(f"backend={backend!r}; accepted: 'local', 'ray'")
    if workers == 1:
        return [Path(run_job(j)) for j in todo]
    with ProcessPoolExecutor(workers) as pool:
        return [Path(p) for p in pool.map(run_job, todo)]
