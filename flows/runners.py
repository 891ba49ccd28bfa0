"""Where the units of a stage run: a Prefect task runner chosen by the config, one task per unit.

    runner:
      kind: threads | processes | dask | ray     # threads is the default
      workers: 4                                 # pool size / local Dask workers / local Ray CPUs
      address: tcp://scheduler:8786              # dask: an existing scheduler; ray: ray://head:10001 or auto

How a stage uses it (flows/ingest.py, chunk.py, synthesize.py, teacher.py)::

    run_units(config.runner, chunk_unit, shards, plan, done, stage="chunk", ...)

`plan(item)` says, in the flow process, whether a unit is already done (or waits for an upstream stage) or
returns the task's parameters: paths, keys and small configs, never data. The unit runs wherever the runner
puts it (a thread, a local process, a Dask or Ray worker on another machine) and writes its shards into the
store; its result is the list of shard entries and a few counts. `done(item, result)` runs back in the flow
process, as results come in, and registers the shards in the catalog: only the flow process ever opens the
catalog, so a worker needs nothing but the shared store path.

Why the flow opens the runner itself, instead of `flow.with_options(task_runner=...)` from the caller:
the runner is a setting of the run, like any other. `d2l ingest --set runner.kind=dask`, a deployment
started from the UI with a runner in its form, and the pipeline calling its stages all read it from the one
`PipelineConfig` the flow receives; nothing else has to know. Prefect documents a task runner as a context
manager that takes `runner.submit(task, parameters)`, which is what the flow engine does with a flow's own
runner; the task runs are still children of the stage's flow run in the UI. The pipeline opens the runner
once (`shared_runner`) so that its stages reuse one Dask cluster or Ray runtime (and the models the workers
have loaded) instead of starting one per stage.

Model-bound units (synthesize, teacher) are limited to `model_concurrency` in flight (default: 1 on
threads, where they share one in-process model; the in-flight window elsewhere, where each worker process
holds its own), and with `gpus_per_model_task` they ask Ray (`num_gpus`) or Dask (resource `GPU`) for a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

U = TypeVar("U")

RunnerKind = Literal["threads", "processes", "dask", "ray"]
DEFAULT_THREADS = 4

__all__ = ["RunnerConfig", "UnitsFailed", "build_task_runner", "open_runner", "run_units", "shared_runner"]


class RunnerConfig(BaseModel):
    """Which Prefect task runner executes the units of the data stages."""

    model_config = ConfigDict(extra="forbid")

    kind: RunnerKind = Field("threads", description=(
        "threads (default: a thread pool in the flow process), processes (local process pool), dask "
        "(prefect-dask: a LocalCluster, or a scheduler at `address`), ray (prefect-ray: a local Ray runtime, "
        "or a cluster at `address`)."))
    workers: int | None = Field(None, ge=1, description=(
        f"threads/processes: pool size (default {DEFAULT_THREADS} threads / min(4, CPUs) processes); dask "
        "without address: LocalCluster workers (processes, 1 thread each; default 2); ray without address: "
        "num_cpus of the local runtime (default: all). With an address it only sizes the in-flight window "
        "(default 8)."))
    address: str | None = Field(None, description=(
        "dask: scheduler address (tcp://host:8786); ray: cluster address (ray://host:10001, or auto)."))
    max_in_flight: int | None = Field(None, ge=1, description=(
        "Units submitted and not yet finished, per stage (default: 2 x workers, at least 4). Bounds the "
        "futures the flow holds and the task runs the Prefect server tracks at once."))
    model_concurrency: int | None = Field(None, ge=1, description=(
        "Model-bound units (synthesize, teacher) in flight at once (default: 1 on threads, where they share "
        "one in-process model; else max_in_flight)."))
    gpus_per_model_task: float = Field(0.0, ge=0, description=(
        "ray: num_gpus of each model-bound task; dask: its `GPU` resource (start workers with "
        "--resources GPU=1). 0: no GPU placement."))
    options: dict[str, Any] = Field(default_factory=dict, description=(
        "Passed through: dask LocalCluster kwargs (without address) or Client kwargs (with address); "
        "ray.init kwargs."))

    @model_validator(mode="after")
    def _check(self) -> "RunnerConfig":
        if self.address and self.kind not in ("dask", "ray"):
            raise ValueError(f"runner.address is for dask or ray, not {self.kind!r}")
        return self

    def pool_size(self) -> int:
        """How many units the engine runs at once, as far as the flow can tell (for the in-flight window)."""
        if self.workers:
            return self.workers
        if self.kind == "threads":
            return DEFAULT_THREADS
        if self.kind == "processes":
            return min(4, os.cpu_count() or 1)
        return 2 if (self.kind == "dask" and not self.address) else 8

    def window(self, model_bound: bool) -> int:
        w = self.max_in_flight or max(4, 2 * self.pool_size())
        if model_bound:
            w = self.model_concurrency or (1 if self.kind == "threads" else w)
        return max(1, w)


# --------------------------------------------------------------------------------------------- building
def _missing(extra: str, exc: ImportError) -> ImportError:
    return ImportError(f"runner.kind={extra} needs prefect-{extra}: pip install 'doc2lora[{extra}]' ({exc})")


def build_task_runner(cfg: RunnerConfig):
    """A fresh (not yet started) Prefect task runner for `cfg`."""
    if cfg.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=cfg.pool_size())
    if cfg.kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=cfg.pool_size())
    if cfg.kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise _missing("dask", exc) from None
        if cfg.address:
            return DaskTaskRunner(address=cfg.address, client_kwargs=dict(cfg.options))
        kwargs = {"n_workers": cfg.workers or 2, "threads_per_worker": 1, "processes": True,
                  "dashboard_address": None, **cfg.options}
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)
    if cfg.kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise _missing("ray", exc) from None
        init: dict[str, Any] = {}
        if not cfg.address:  # a runtime of our own (an existing cluster refuses these settings)
            init = {"include_dashboard": False, "log_to_driver": False}
            if cfg.workers:
                init["num_cpus"] = cfg.workers
        init.update(cfg.options)
        return RayTaskRunner(address=cfg.address, init_kwargs=init)
    raise ValueError(f"unknown runner kind {cfg.kind!r}")


class _LazyRunner:
    """A runner opened for several stages, started on first use (a rerun with nothing to do starts nothing)."""

    def __init__(self, cfg: RunnerConfig):
        self.cfg = cfg
        self.runner: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self.runner is None:
                runner = build_task_runner(self.cfg)
                runner.__enter__()
                self.runner = runner
            return self.runner

    def close(self, *exc_info: Any) -> None:
        with self._lock:
            runner, self.runner = self.runner, None
        if runner is not None:
            runner.__exit__(*(exc_info or (None, None, None)))


_active: dict[str, _LazyRunner] = {}  # runner config (JSON) -> the runner that the stages of this process share
_active_lock = threading.Lock()


def _cfg_key(cfg: RunnerConfig) -> str:
    return cfg.model_dump_json()


@contextlib.contextmanager
def open_runner(cfg: RunnerConfig) -> Iterator[Any]:
    """A started task runner for `cfg`: the one a caller opened with `shared_runner` (same config), else a
    new one, stopped when the block ends."""
    with _active_lock:
        shared = _active.get(_cfg_key(cfg))
    if shared is not None:
        yield shared.get()
        return
    with build_task_runner(cfg) as runner:
        yield runner


@contextlib.contextmanager
def shared_runner(cfg: RunnerConfig) -> Iterator[None]:
    """Share one runner between the stages run inside this block (the pipeline): one Dask cluster or Ray
    runtime for the whole run, whose warm workers keep the models they loaded. Started on first use."""
    key = _cfg_key(cfg)
    with _active_lock:
        if key in _active:  # nested: the outer block owns it
            owner = None
        else:
            owner = _active[key] = _LazyRunner(cfg)
    if owner is None:
        yield
        return
    try:
        yield
    except BaseException as exc:
        with _active_lock:
            _active.pop(key, None)
        owner.close(type(exc), exc, exc.__traceback__)
        raise
    with _active_lock:
        _active.pop(key, None)
    owner.close()


@contextlib.contextmanager
def _placement(cfg: RunnerConfig, model_bound: bool) -> Iterator[None]:
    """GPU placement of model-bound tasks: Ray remote options or a Dask resource annotation."""
    if not (model_bound and cfg.gpus_per_model_task):
        yield
        return
    if cfg.kind == "ray":
        from prefect_ray.context import remote_options

        with remote_options(num_gpus=cfg.gpus_per_model_task):
            yield
    elif cfg.kind == "dask":
        import dask

        with dask.annotate(resources={"GPU": cfg.gpus_per_model_task}):
            yield
    else:
        yield


# ------------------------------------------------------------------------------------------------ units
class UnitsFailed(RuntimeError):
    """Some units of a stage raised; every other unit finished and was registered (a rerun does the rest)."""

    def __init__(self, stage: str, failures: list[tuple[Any, BaseException]], total: int):
        self.stage, self.failures, self.total = stage, failures, total
        first_item, first = failures[0]
        detail = "".join(traceback.format_exception_only(type(first), first)).strip()
        super().__init__(f"{stage}: {len(failures)} of {total} units failed (the others are registered; a rerun "
                         f"retries only these). First: {first_item!r}: {detail}")


def _ephemeral_api_url() -> str | None:
    """The URL of this process's temporary Prefect server when no PREFECT_API_URL is set (else None)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    try:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the process's singleton; started by the flow run's client
        return server.api_url if server.server_process is not None else None
    except Exception:  # noqa: BLE001 - no server package, nothing started: workers decide for themselves
        return None


@contextlib.contextmanager
def _worker_settings(cfg: RunnerConfig) -> Iterator[None]:
    """Task runs in other processes report to this flow's Prefect API. With a real server they get its URL
    from the serialized settings; with the temporary server `d2l` starts when PREFECT_API_URL is unset, the
    URL is put into the settings that travel with each task, or every worker would start a server of its own."""
    url = _ephemeral_api_url() if cfg.kind != "threads" else None
    if not url:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def _submit_window(runner: Any, task: Any, calls: Sequence[tuple[U, dict[str, Any]]], window: int,
                   placement: Callable[[], contextlib.AbstractContextManager],
                   settings: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                   ) -> Iterator[tuple[U, Any, BaseException | None]]:
    """Submit `calls` with at most `window` in flight; yield (item, result, error) in completion order."""
    done_q: queue.Queue = queue.Queue()
    pending = iter(calls)
    in_flight = 0

    def submit_next() -> bool:
        nonlocal in_flight
        try:
            item, params = next(pending)
        except StopIteration:
            return False
        with placement(), settings():
            fut = runner.submit(task, parameters=params)
        fut.add_done_callback(lambda f, item=item: done_q.put((item, f)))
        in_flight += 1
        return True

    while in_flight < window and submit_next():
        pass
    while in_flight:
        item, fut = done_q.get()
        in_flight -= 1
        try:
            res, err = fut.result(raise_on_failure=True), None
        except BaseException as exc:  # noqa: BLE001 - reported per unit, the others go on
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            res, err = None, exc
        submit_next()
        yield item, res, err


_SKIPPED = object()


def run_units(
    runner_cfg: RunnerConfig,
    task: Any,
    items: Sequence[U],
    plan: Callable[[U], dict[str, Any] | str],
    done: Callable[[U, Any], None],
    *,
    stats: dict[str, Any],
    stage: str,
    unit: str = "unit",
    progress: bool = True,
    model_bound: bool = False,
) -> None:
    """Run `task` once per item that `plan` does not skip, through the configured runner.

    `plan(item)` (flow process): a dict of the task's parameters, or the name of a stats counter to bump
    when the item is skipped ("done_before", "waiting_for_chunks", ...). `done(item, result)` (flow process,
    as results come in): register the unit's shards and add its counts. A unit that raises does not stop the
    others; when all are finished, `UnitsFailed` names the failures.
    """
    from tqdm.auto import tqdm

    from flows.progress import bars, tracked

    calls: list[tuple[U, dict[str, Any]]] = []
    skipped: list[U] = []
    for item in items:
        p = plan(item)
        if isinstance(p, str):
            stats[p] = stats.get(p, 0) + 1
            skipped.append(item)
        else:
            calls.append((item, p))
    failures: list[tuple[U, BaseException]] = []

    def outcomes() -> Iterator[tuple[U, Any, BaseException | None]]:
        for item in skipped:
            yield item, _SKIPPED, None
        if not calls:
            return
        with open_runner(runner_cfg) as runner:
            yield from _submit_window(runner, task, calls, runner_cfg.window(model_bound),
                                      lambda: _placement(runner_cfg, model_bound),
                                      lambda: _worker_settings(runner_cfg))

    bar = tqdm(outcomes(), total=len(items), desc=stage, unit=unit, disable=not bars(progress))
    for item, res, err in tracked(bar, stage, total=len(items), unit=unit, stats=stats):
        if err is not None:
            failures.append((item, err))
            log.error("%s: unit %r failed: %s", stage, item, err)
        elif res is not _SKIPPED:
            done(item, res)
    if failures:
        stats["failed"] = len(failures)
        raise UnitsFailed(stage, failures, len(calls))
