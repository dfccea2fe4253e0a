"""The Ray distributor: the same shard work as the local engine, on a Ray cluster.

Two ways, one result (the same rows, shard files and manifest as the local engine, so stores and
score directories resume across engines):

* **Workers write** (:meth:`RayEngine.write_shards`, every directory output): the driver plans the
  chunks (one per output shard) and hands whole chunks to a pool of actors (``ray_workers``, each
  with its share of the CPUs and ``gpus_per_worker`` GPUs). Each actor runs the local
  :class:`~imgsent.engine.FeatureEngine` over its chunk (decoding processes sized to its share of
  its node's CPUs) and writes the shard itself with the local loop's own function
  (:func:`~imgsent.shards.write_chunk`: temporary file, fsync, rename), returning only the
  manifest entry. The driver never sees a feature: it
  lists finished shards, reports progress, and gives the chunks of a worker that died (its node
  lost, an OOM kill) to the others. The output must be on a filesystem every node sees.
* **Streams** (:meth:`RayEngine.run`: one output file, stdout): Ray Data maps slices of the
  references over a pool of actors (``ray_workers``, sized as the writing workers), each running
  the same local engine over its slice, and hands the rows and features back in order as Arrow
  tables (:func:`batch_table`); the driver applies the head (as every other path does:
  :class:`~imgsent.scoring.ScoreTableBuilder`) and writes the one file.

Both paths' remote unit is :class:`_EngineActor`: "the local engine over a slice of references".

Ray is an optional extra (``pip install 'imgsent[ray]'``); nothing here is imported by the local
engine.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .backbones import Backbone, create_backbone, fingerprints_match
from .batches import FeatureBatch
from .engine import FeatureEngine
from .engineplan import CUDA_BATCH_SIZE, EnginePlan, plan_engine
from .errors import ImgsentError, ImgsentWarning
from .inputs import ImageRef
from .options import DEFAULT_BATCH_SIZE, RunOptions
from .shards import Chunk, Output, WorkItem, write_chunk
from .specs import BackboneSpec

_FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME")  # and imgsent's (options.ENV)


def resolve_actor_numerics(precision: str, on_gpu: bool, ask_card: Callable[[], str]) -> str:
    """What ``precision`` means for Ray actors: as :func:`imgsent.precision.resolve_numerics` says
    on their device; ``auto`` on GPUs is what ``ask_card()`` (a card of the cluster) says."""
    if not on_gpu:
        return "fp32" if precision in ("auto", "tf32") else precision
    return ask_card() if precision == "auto" else precision


def _card_numerics(precision: str) -> str:
    """Run on a GPU of the cluster: what ``precision`` means on its card."""
    import torch

    from .precision import resolve_numerics

    return resolve_numerics(torch.device("cuda"), precision)


def forwarded_env() -> dict[str, str]:
    """The settings a Ray worker must see as the driver does: the variables :data:`imgsent.options.ENV`
    marks (weights, cache, URL timeouts and limits, download timeout, device decoder...) and the hubs' caches. Every
    actor and decode task is handed them and sets them in its process first, so they arrive whether
    or not imgsent started Ray (a per-actor ``runtime_env`` would cost each actor a fresh process)."""
    from .options import ENV

    wanted = {k for k, (_what, workers) in ENV.items() if workers} | set(_FORWARDED_ENV)
    return {k: v for k, v in os.environ.items() if k in wanted}


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImgsentError("--engine ray needs Ray Data: pip install 'imgsent[ray]'") from None
    return ray


def _worker_spec(bb: Backbone) -> BackboneSpec:
    """A spec that builds ``bb`` again on a worker: its recipe's spec (keyed by file names) with
    every file it names at the absolute path the driver read it from (a filesystem the workers
    share; the fingerprint check catches another file under that path)."""
    recipe = bb.recipe()
    paths = {f["name"]: f["path"] for f in recipe.get("files", [])}

    def where(name: str) -> str:
        found = paths.get(name) or paths.get(os.path.basename(name))
        return found or (os.path.abspath(name) if os.path.exists(name) else name)

    return BackboneSpec.parse(recipe["spec"]).map_files(where)


def _worker_backbones(specs: list[tuple[BackboneSpec, bool, dict]], options: RunOptions) -> list[Backbone]:
    """The driver's backbones, built again on a worker; weights that resolve differently there
    (another file, another version) are refused."""
    backbones = []
    for spec, random_weights, fingerprint in specs:
        bb = create_backbone(spec, random_weights=random_weights, int8=options.precision == "int8")
        if not fingerprints_match(fingerprint, bb.fingerprint):
            raise ImgsentError(f"{spec}: this Ray worker resolved other weights than the driver")
        backbones.append(bb)
    return backbones


class _EngineActor:
    """The one remote unit of both Ray paths: the driver's backbones built again here once, and the
    local :class:`~imgsent.engine.FeatureEngine` run over each slice of references it is given,
    under the plan the driver resolved for every actor (:meth:`RayEngine.actor_plan`: the CPUs Ray
    reserves for it give its lanes on a CPU and its decoding processes, or the run's ``workers``).
    A failure to build is kept and raised by the first call (a task error the driver can read,
    rather than a dead actor)."""

    def __init__(
        self,
        specs: list[tuple[BackboneSpec, bool, dict]],
        plan: EnginePlan,
        options: RunOptions,
        env: dict[str, str],
    ):
        os.environ.update(env)  # the driver's settings (forwarded_env), before the decoding processes start
        self.failure: BaseException | None = None
        try:
            import ray
            import torch

            torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
            self.engine = FeatureEngine(_worker_backbones(specs, options), options, plan=plan)
        except Exception as exc:
            self.failure = exc

    def ready(self) -> int:
        """Once the actor is built, its decoding processes; raises what building it raised."""
        if self.failure is not None:
            raise self.failure
        return self.engine.workers

    def run(self, refs: list[ImageRef]) -> Iterator[FeatureBatch]:
        """The engine's batches for ``refs`` (one group: batches depend on the slice only)."""
        self.ready()
        return self.engine.run(refs, groups=[len(refs)])


class _ShardWorker(_EngineActor):
    """Ray actor of the workers-write path: turns whole chunks into finished shard files (decode,
    embed, tables, write, rename) and returns their manifest entries."""

    def __init__(
        self,
        specs: list[tuple[BackboneSpec, bool, dict]],
        plan: EnginePlan,
        options: RunOptions,
        outputs: list[Output],
        env: dict[str, str],
    ):
        self.outputs = outputs
        self.rows: tuple[int, int] = (-1, 0)  # (chunk index, rows of it embedded so far), read by progress()
        super().__init__(specs, plan, options, env)

    def write(self, refs: list[ImageRef], item: WorkItem) -> dict:
        """The work ``item`` (its chunk's rows ``refs``), as the local loop writes one:
        :func:`~imgsent.shards.write_chunk`, its finished files' entries returned to the driver."""
        self.rows = (item.chunk.index, 0)
        return write_chunk(self._counted(self.run(refs), item.chunk.index), item, self.outputs)

    def _counted(self, batches: Iterator[FeatureBatch], index: int) -> Iterator[FeatureBatch]:
        for batch in batches:
            yield batch
            self.rows = (index, self.rows[1] + len(batch))

    def progress(self) -> tuple[int, int]:
        return self.rows


class _StreamActor(_EngineActor):
    """Ray Data actor of the streaming path: a slice of references (columns ``id``, ``path``,
    ``source``, ``meta``) in, its rows and features out as one Arrow table (:func:`batch_table`)."""

    def __call__(self, batch: dict):
        import pyarrow as pa

        refs = [
            ImageRef(str(i), str(p), str(s), str(m))
            for i, p, s, m in zip(batch["id"], batch["path"], batch["source"], batch["meta"])
        ]
        return pa.concat_tables([batch_table(b, self.engine.keys) for b in self.run(refs)])


def batch_table(batch: FeatureBatch, keys: list[str]):
    """A :class:`FeatureBatch` as an Arrow table, what travels back from a streaming actor: the rows'
    fields with their nulls (an error row's missing size or reason), one fixed-size float32 list
    column per backbone (``feat0``...). :func:`table_batch` reads it back."""
    import pyarrow as pa

    n = len(batch)
    cols = {
        "id": pa.array(batch.ids, pa.string()),
        "path": pa.array(batch.paths, pa.string()),
        "status": pa.array(batch.status, pa.string()),
        "error": pa.array(batch.error, pa.string()),
        "width": pa.array(batch.width, pa.int64()),
        "height": pa.array(batch.height, pa.int64()),
        "meta": pa.array(batch.meta or [""] * n, pa.string()),  # "" = none kept, as ImageRef.meta
        "source": pa.array(batch.sources or [""] * n, pa.string()),
    }
    for j, key in enumerate(keys):
        x = np.ascontiguousarray(batch.features[key], dtype=np.float32)
        cols[f"feat{j}"] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    return pa.table(cols)


def table_batch(table, keys: list[str]) -> FeatureBatch:
    """The :class:`FeatureBatch` of a :func:`batch_table` table."""
    n = table.num_rows

    def column(name: str) -> list:
        return table.column(name).to_pylist()

    meta, sources = column("meta"), column("source")
    features = {}
    for j, key in enumerate(keys):
        values = table.column(f"feat{j}").combine_chunks().flatten()
        features[key] = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, -1)
    return FeatureBatch(
        ids=column("id"),
        paths=column("path"),
        status=column("status"),
        error=column("error"),
        width=column("width"),
        height=column("height"),
        features=features,
        meta=meta if any(meta) else [],
        sources=sources if any(sources) else [],
    )


class RayEngine:
    """Run backbones over images on Ray Data; the :class:`~imgsent.batches.Engine` contract.

    ``options``: the run's :class:`~imgsent.options.RunOptions`: ``ray_workers`` actors in the pool
    (default 1), ``gpus_per_worker`` (``num_gpus`` of each actor), ``ray_address`` (an existing
    cluster; default: start a local one), and the engine settings each actor uses. Device and GPU
    settings are checked here, on the driver, with one clear line.
    """

    def __init__(
        self,
        backbones: Sequence[Backbone],
        options: RunOptions | None = None,
        *,
        num_cpus: int | None = None,
        **overrides,
    ):
        opts = RunOptions.build(options, **overrides)
        _check_devices(opts)
        ray = require_ray()
        if not opts.progress:  # quiet: Ray's and Ray Data's own logs too (Python and the C++ core)
            _quiet_ray()
        if not ray.is_initialized():
            env = forwarded_env()
            quiet = contextlib.nullcontext() if opts.progress else _stderr_silenced()
            with quiet:  # Ray's C++ core announces its log level on stderr before any setting applies
                ray.init(
                    address=opts.ray_address,
                    num_cpus=num_cpus if opts.ray_address is None else None,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                    logging_level=logging.INFO if opts.progress else logging.ERROR,
                    runtime_env={"env_vars": env},
                )
        if not opts.progress:
            _quiet_ray()
        if opts.gpus_per_worker > 0 and not ray.cluster_resources().get("GPU", 0):
            raise ImgsentError(
                f"gpus_per_worker={opts.gpus_per_worker} but the Ray cluster has no GPU; "
                f"use gpus_per_worker=0 (CPU actors) or a cluster with GPUs"
            )
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # shards must hold the ids the plan expects
        ctx.enable_progress_bars = False
        self.ray = ray
        self.backbones = list(backbones)
        self.options = opts
        self.specs = [(_worker_spec(bb), bool(bb.fingerprint.get("random")), bb.fingerprint) for bb in backbones]
        device = "cuda" if opts.gpus_per_worker > 0 and opts.device == "auto" else opts.device
        if opts.gpus_per_worker == 0 and opts.device == "auto":
            device = "cpu"  # an actor with no GPU asked for must not grab one it happens to see
        # Resolved here, so that every actor computes the numerics the store records, as a local run
        # on the same card would (precision.resolve_numerics): auto is asked of a card like the
        # actors' (a task with their GPU share), bf16 where it has bf16 cores, else fp16.
        on_gpu = device.startswith("cuda")
        self.decoder = None  # decode="device" runs with the local engine only
        self.numerics = resolve_actor_numerics(opts.precision, on_gpu, lambda: self._card_numerics(opts))
        self.batch_size = opts.batch_size or (CUDA_BATCH_SIZE if on_gpu else DEFAULT_BATCH_SIZE)
        # The same rule as a local engine's (runners.prepare), decided here so that the
        # store's header can say it: the actors then run "onnx", where an export that fails stops
        # the run instead of leaving one actor on torch.
        self.onnx_keys = self._onnx_keys(opts, on_gpu or device.startswith("mps"))
        self.actor_options = dataclasses.replace(
            opts,
            device=device,
            precision=self.numerics,
            runtime="onnx" if self.onnx_keys else "torch",
            batch_size=self.batch_size,
            engine="local",
            progress=False,
        )
        self.resources = self.worker_resources()
        self.plan = self.actor_plan()

    def actor_plan(self) -> EnginePlan:
        """The plan every actor's engine runs, resolved here once (:func:`imgsent.engineplan.plan_engine`)
        for a worker's device, numerics and reserved CPUs: its lanes and decoding processes."""
        import torch

        device = torch.device("cuda" if self.actor_options.device.startswith("cuda") else self.actor_options.device)
        cores = int(self.resources["num_cpus"])
        return plan_engine(self.actor_options, device=device, numerics=self.numerics, cores=cores)

    def _card_numerics(self, opts: RunOptions) -> str:
        """What ``auto`` means on a card of the cluster like the actors' (one short task there)."""
        probe = self.ray.remote(num_gpus=opts.gpus_per_worker or 1)(_card_numerics)
        return self.ray.get(probe.remote(opts.precision))

    def _onnx_keys(self, opts: RunOptions, off_cpu: bool) -> list[str]:
        from . import onnxrunner

        if not onnxrunner.applies(opts.runtime, not off_cpu, opts.compile, self.numerics):
            return []
        return [bb.key for bb in self.backbones if onnxrunner.runs_there(bb)]

    def runtime_record(self) -> dict[str, str]:
        return {key: "onnx" for key in self.onnx_keys}

    def adopt_runtimes(self, record: dict[str, str]) -> None:
        """As :meth:`imgsent.engine.FeatureEngine.adopt_runtimes`: resume a store as it was begun."""
        from .onnxrunner import runs_there

        keys = [bb.key for bb in self.backbones if record.get(bb.key) == "onnx"]
        if any(not runs_there(bb) for bb in self.backbones if bb.key in keys):
            raise ImgsentError("this store ran a backbone on ONNX Runtime that cannot run there now")
        self.onnx_keys = keys
        self.actor_options = dataclasses.replace(self.actor_options, runtime="onnx" if keys else "torch")
        self.plan = self.actor_plan()

    @property
    def keys(self) -> list[str]:
        return [bb.key for bb in self.backbones]

    def run(self, refs: Sequence[ImageRef], groups: Sequence[int] | None = None) -> Iterator[FeatureBatch]:
        """Ordered feature batches for ``refs`` (``groups`` is accepted for the engine contract)."""
        if not refs:
            return
        import ray.data

        size = self.batch_size * STREAM_SLICE
        ds = ray.data.from_items(
            [{"id": r.id, "path": r.path, "source": r.source, "meta": r.meta} for r in refs],
            override_num_blocks=max(1, -(-len(refs) // size)),
        )
        resources = self.resources
        ds = ds.map_batches(
            _StreamActor,
            batch_size=size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.options.ray_workers or 1),
            num_cpus=resources["num_cpus"],
            num_gpus=resources["num_gpus"] or None,
            fn_constructor_kwargs={
                "specs": self.specs,
                "plan": self.plan,
                "options": self.actor_options,
                "env": forwarded_env(),
            },
        )
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            if table.num_rows:
                yield table_batch(table, self.keys)

    def write_shards(
        self,
        refs: Sequence[ImageRef],
        items: Sequence[WorkItem],
        outputs: list[Output],
        done: Callable[[dict, int], None],
        progress: Callable[[int], None],
    ) -> dict[str, str]:
        """Workers write: each of ``items`` (its chunk's rows ``refs[start:stop]``) becomes a finished
        shard in every output of ``outputs`` that lacks it (``item.lacking``), written by a Ray worker.
        ``done(result, rows_reported)`` gets each finished chunk's ``{index, entries, schemas,
        errors}`` (entries in the order of the outputs that lacked it); ``progress(rows)`` gets rows
        embedded meanwhile. Returns lines for the run summary (workers, lost workers)."""
        if not items:
            return {}
        return _ShardPool(self, outputs).run(refs, items, done, progress)

    def worker_resources(self) -> dict[str, float]:
        """What each writing worker asks Ray for: ``gpus_per_worker`` GPUs and an even share of the
        CPUs (a GPU worker: its node's CPUs over its node's GPU workers; a CPU worker: the
        cluster's CPUs over ``ray_workers``, at most one node's), at least 1."""
        ray, opts = self.ray, self.options
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        wanted = opts.ray_workers or 1
        if opts.gpus_per_worker > 0:
            shares = [r.get("CPU", 0) * opts.gpus_per_worker / r["GPU"] for r in nodes if r.get("GPU")]
        else:
            biggest = max((r.get("CPU", 0) for r in nodes), default=1)
            shares = [min(biggest, sum(r.get("CPU", 0) for r in nodes) / wanted)]
        cpus = max(1, int(min(shares, default=1)))
        return {"num_cpus": cpus, "num_gpus": opts.gpus_per_worker}


START_TIMEOUT_S = 600.0  # IMGSENT_RAY_START_TIMEOUT: how long a run waits with no worker able to start
CHUNK_TRIES = 3  # a chunk whose worker died this many times stops the run (it, not the workers, is the cause)
DEPTH = 2  # chunks queued on each worker (the next one starts as soon as one is written)
STREAM_SLICE = 8  # batches in one streaming actor call (its decoding processes start once per call)


class _ShardPool:
    """The driver's side of the workers-write path: starts ``ray_workers`` writing workers, keeps
    each busy with up to :data:`DEPTH` chunks, lists what they finish, and hands the chunks of a
    worker that died to the others (starting a replacement where the cluster has room)."""

    def __init__(self, engine: RayEngine, outputs: list[Output]):
        ray = engine.ray
        self.ray = ray
        self.resources = engine.resources
        self.actor_class = ray.remote(concurrency_groups={"report": 1}, max_restarts=0, **self.resources)(_ShardWorker)
        self.args = (engine.specs, engine.plan, engine.actor_options, ray.put(outputs), forwarded_env())
        self.decoders: list[int] = []  # decoding processes of each worker started
        self.wanted = engine.options.ray_workers or 1
        self.starting: dict = {}  # ready() future -> actor
        self.live: dict = {}  # actor -> chunks queued on it, oldest (the one being written) first
        self.calls: dict = {}  # write() future -> (actor, chunk)
        self.polls: dict = {}  # progress() future -> actor
        self.dead: set = set()
        self.lost = 0
        self.redone = 0

    def _start(self) -> None:
        actor = self.actor_class.remote(*self.args)
        self.starting[actor.ready.remote()] = actor

    def run(self, refs, items, done, progress) -> dict[str, str]:
        ray = self.ray
        chunks = [it.chunk for it in items]
        by_index = {it.chunk.index: it for it in items}
        queue = collections.deque(chunks)
        tries: collections.Counter = collections.Counter()
        shown: dict[int, int] = {}  # rows already reported per chunk
        finished: set[int] = set()  # (a late progress report of one of these is ignored)
        timeout = float(os.environ.get("IMGSENT_RAY_START_TIMEOUT", START_TIMEOUT_S))
        if len(chunks) < self.wanted:
            warnings.warn(
                f"{len(chunks)} shard(s) to write for {self.wanted} Ray workers: a shard is one worker's job, so "
                f"{self.wanted - len(chunks)} will have nothing to do; a smaller --rows-per-shard spreads the work",
                ImgsentWarning,
                stacklevel=4,
            )
        for _ in range(min(self.wanted, len(chunks))):
            self._start()
        idle_since, last_poll = time.monotonic(), 0.0
        try:
            while queue or self.calls:
                for actor, queued in self.live.items():
                    while queue and len(queued) < DEPTH:
                        c = queue.popleft()
                        self.calls[actor.write.remote(list(refs[c.start : c.stop]), by_index[c.index])] = (actor, c)
                        queued.append(c)
                if self.live:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > timeout:
                    raise ImgsentError(self._no_worker_message(timeout))
                ready, _ = ray.wait([*self.calls, *self.starting, *self.polls], num_returns=1, timeout=1.0)
                for f in ready:
                    if f in self.starting:
                        self._started(f)
                    elif f in self.polls:
                        actor = self.polls.pop(f)
                        try:
                            index, rows = ray.get(f)
                        except ray.exceptions.RayError:
                            continue  # a dead worker: its write() call says so
                        if index not in finished and rows > shown.get(index, 0):
                            progress(rows - shown.get(index, 0))
                            shown[index] = rows
                    else:
                        actor, c = self.calls.pop(f)
                        try:
                            result = ray.get(f)
                        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                            head = self._lost(actor, exc)
                            if head is not None:  # the chunk it was writing when it died
                                tries[head.index] += 1
                                if tries[head.index] >= CHUNK_TRIES:
                                    raise ImgsentError(
                                        f"rows {head.start}-{head.stop - 1} (shard {head.index}) were being written "
                                        f"by {CHUNK_TRIES} Ray workers that died; stopped (finished shards are "
                                        f"kept). Last: {_first_line(exc)}"
                                    ) from None
                            queue.appendleft(c)
                            self.redone += 1
                            continue
                        except ray.exceptions.RayTaskError as exc:
                            raise _cause(exc) from None
                        if c in self.live.get(actor, ()):  # (a worker may finish a chunk, then die)
                            self.live[actor].remove(c)
                        finished.add(c.index)
                        done(result, shown.pop(c.index, 0))
                if time.monotonic() - last_poll >= 1.0:
                    last_poll = time.monotonic()
                    for actor, queued in self.live.items():
                        if queued and actor not in self.polls.values():
                            self.polls[actor.progress.options(concurrency_group="report").remote()] = actor
        finally:
            for actor in [*self.live, *self.starting.values()]:
                ray.kill(actor, no_restart=True)
        details = {"ray workers": f"{len(self.live) + self.lost} x {self._resources_text()}"}
        if self.decoders:
            counts = sorted(set(self.decoders))
            details["ray workers"] += f", {'/'.join(map(str, counts))} decoding process(es) each"
        if self.starting:
            details["ray workers"] += (
                f" ({len(self.starting)} more had not started by the end: no room on the cluster, or still starting)"
            )
        if self.lost:
            details["ray workers lost"] = f"{self.lost} (their {self.redone} unfinished shard(s) redone by others)"
        return details

    def _started(self, f) -> None:
        actor = self.starting.pop(f)
        try:
            self.decoders.append(self.ray.get(f))
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError) as exc:
            self._lost(actor, exc)
            return
        except self.ray.exceptions.RayTaskError as exc:
            raise _cause(exc) from None
        self.live[actor] = []

    def _lost(self, actor, exc: BaseException) -> Chunk | None:
        """A worker died (its node lost, killed): counted once, a replacement started (it waits for
        room on the cluster) unless workers keep dying. Returns the chunk it was writing (None when
        this death was already counted, or it had none)."""
        if actor in self.dead:
            return None
        self.dead.add(actor)
        self.ray.kill(actor, no_restart=True)  # if it only seemed gone (unreachable a while), it writes no more
        queued = self.live.pop(actor, [])
        self.starting = {f: a for f, a in self.starting.items() if a is not actor}
        self.lost += 1
        if self.lost > 2 * self.wanted + 2:
            raise ImgsentError(
                f"{self.lost} Ray workers died; stopped (finished shards are kept). Last: {_first_line(exc)}"
            )
        self._start()
        return queued[0] if queued else None

    def _resources_text(self) -> str:
        r = self.resources
        return f"{r['num_cpus']} CPU" + (f" + {r['num_gpus']:g} GPU" if r["num_gpus"] else "")

    def _no_worker_message(self, timeout: float) -> str:
        return (
            f"no Ray worker could start within {timeout:.0f} s (each asks for {self._resources_text()}); the cluster "
            f"has no room for one, or its nodes were lost. Finished shards are kept. (IMGSENT_RAY_START_TIMEOUT sets "
            f"the wait.)"
        )


def _cause(exc: BaseException) -> BaseException:
    """What a Ray task raised: an :class:`ImgsentError` as its one line, anything else as it was."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, ImgsentError):
        return ImgsentError(str(cause))
    return cause if isinstance(cause, BaseException) else exc


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null for the block (output of C++ code included), then back."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _quiet_ray() -> None:
    """Ray's loggers (they set levels of their own) to errors only; the C++ core's log too, for
    processes started from here on."""
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    for name in [n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")] + ["ray"]:
        logging.getLogger(name).setLevel(logging.ERROR)


def _check_devices(opts: RunOptions) -> None:
    """Device and GPU settings that cannot work on Ray, refused before any actor starts."""
    device = opts.device.split(":")[0]
    if device == "cuda" and ":" in opts.device:
        raise ImgsentError(
            f"device {opts.device}: on Ray each actor sees only the GPUs Ray gives it; use device cuda or auto"
        )
    if opts.gpus_per_worker > 0 and device in ("cpu", "mps"):
        raise ImgsentError(f"gpus_per_worker={opts.gpus_per_worker} asks for GPUs but device is {opts.device}")
    if device == "cuda" and opts.gpus_per_worker == 0:
        raise ImgsentError(
            "device cuda on Ray needs GPUs for the actors: set gpus_per_worker (for example 1), "
            "or Ray schedules them on CPU-only nodes"
        )
