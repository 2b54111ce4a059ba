"""`lmforge data RECIPE.yaml`: raw local text -> cleaned, deduplicated, tokenized, packed training set.

    sources -> normalize -> filters -> PII scrub -> dedup keys      (executor 1: `executor.tasks` tasks)
            -> exact + MinHash-LSH clusters                         (executor 2: one task)
            -> split by document -> tokenizer -> pack -> report    (executor 3: one task)

Every block is a datatrove ``PipelineStep``; the recipe's ``executor`` picks local processes, Slurm or Ray,
and a rerun with ``resume=auto`` skips the tasks that finished. Work happens in ``<output_dir>.partial``,
renamed to ``output_dir`` only when everything is written.

Outputs in ``output_dir``: ``dataset/`` (``DatasetDict`` train/validation, column ``input_ids`` of
``pack.block_size`` tokens: what ``lmforge pretrain`` reads with ``data.path``), ``tokenizer/``,
``documents.jsonl.gz``, ``report.json``, ``report.md``, ``lengths.png``, ``drops.png``, ``recipe.yaml``,
``logs/`` and, with ``filters.write_dropped``, ``dropped/<filter>/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import ClassVar, Literal

from lmforge import outputs
from lmforge.config import RunConfig, UserError, dump, help_field, nested, to_dict
from lmforge.pipeline.clean import (
    FiltersConfig,
    LengthProbe,
    NormalizeConfig,
    Normalizer,
    PIIConfig,
    PIIScrubber,
    build_filters,
)
from lmforge.pipeline.dedup import DedupClusters, DedupConfig, DedupKeys
from lmforge.pipeline.logs import quiet_datatrove
from lmforge.pipeline.publish import PackConfig, Publish
from lmforge.pipeline.readers import LocalReader, SourceConfig, StepAbort, aborts_in_process, expand_sources
from lmforge.pipeline.tokenizer import TokenizerConfig


@dataclasses.dataclass
class SlurmConfig:
    partition: str = help_field("", help="Slurm partition (required for kind: slurm).")
    time: str = help_field("04:00:00", help="Time limit per job.")
    cpus_per_task: int = help_field(1, help="CPUs per task.")
    mem_per_cpu_gb: int = help_field(2, help="Memory per CPU (GB).")
    venv_path: str | None = help_field(None, help="Virtual environment the jobs activate (its folder or bin/activate); "
                                       "default: the Python running lmforge (its bin/ first on PATH).")
    sbatch_args: dict[str, str] = help_field({}, help="Extra #SBATCH options, e.g. {account: myacct}.")


@dataclasses.dataclass
class RayConfig:
    address: str = help_field("auto", help="Ray cluster to run on: auto (RAY_ADDRESS, else the cluster `ray start` "
                              "began on this machine), host:port of its head, or local (a private Ray for this run).")
    cpus_per_task: int = help_field(1, help="CPUs per Ray task.")
    mem_per_cpu_gb: float = help_field(2, help="Memory per CPU (GB).")


@dataclasses.dataclass
class ExecutorConfig:
    kind: Literal["local", "slurm", "ray"] = help_field("local", help="Where tasks run: local processes, Slurm jobs or Ray.")
    tasks: int = help_field(1, help="Shards of the cleaning pipeline (each reads every tasks-th file).")
    workers: int = help_field(1, help="Tasks running at once (local/ray; -1: all).")
    slurm: SlurmConfig = nested(SlurmConfig)
    ray: RayConfig = nested(RayConfig)

    def problems(self) -> list[str]:
        out = []
        if self.tasks < 1:
            out.append("tasks: must be >= 1")
        if self.workers == 0 or self.workers < -1:
            out.append("workers: must be >= 1 (or -1 for all tasks at once)")
        if self.kind == "slurm" and not self.slurm.partition:
            out.append("slurm.partition: required with kind: slurm")
        return out


@dataclasses.dataclass
class Config(RunConfig):
    STAGE: ClassVar[str] = "data"
    sources: list[SourceConfig] = help_field([], help="The mixture: a list of {files, name, format, text_key, id_key, weight, text_unit}.")
    executor: ExecutorConfig = nested(ExecutorConfig)
    normalize: NormalizeConfig = nested(NormalizeConfig)
    filters: FiltersConfig = nested(FiltersConfig)
    pii: PIIConfig = nested(PIIConfig)
    dedup: DedupConfig = nested(DedupConfig)
    tokenizer: TokenizerConfig = nested(TokenizerConfig)
    pack: PackConfig = nested(PackConfig)

    def problems(self) -> list[str]:
        out = super().problems()
        if self.resume not in ("none", "auto"):
            out = [p for p in out if not p.startswith("resume:")]
            out.append("resume: the data stage takes 'none' or 'auto' (continue <output_dir>.partial)")
        if not self.sources:
            out.append("sources: required; a list like [{files: [data/*.jsonl], text_key: text}]")
        for i, src in enumerate(self.sources):
            out += [f"sources[{i}].{p}" for p in src.problems()]
        names = [s.name for s in self.sources if s.name]
        if len(names) != len(set(names)):
            out.append("sources: two sources share a name; names must be unique")
        return out


# --------------------------------------------------------------------------------------------
# The three pipelines


def pipelines(cfg: Config, work: Path, final_dir: str) -> dict[str, list]:
    from datatrove.pipeline.writers import JsonlWriter

    clean = [LocalReader(cfg.sources, cfg.seed), LengthProbe(str(work / "lengths" / "read"))]
    if cfg.normalize.enabled:
        clean.append(Normalizer(cfg.normalize))
    clean += build_filters(cfg.filters, str(work / "dropped"))
    if cfg.pii.enabled:
        clean.append(PIIScrubber(cfg.pii))
    clean += [DedupKeys(str(work / "dedup" / "keys"), cfg.dedup),
              JsonlWriter(str(work / "clean"), output_filename="${rank}.jsonl")]
    n = cfg.executor.tasks
    return {
        "clean": clean,
        "dedup": [DedupClusters(str(work / "dedup" / "keys"), str(work / "dedup" / "remove"), cfg.dedup, n)],
        "publish": [Publish(str(work), cfg, n, final_dir)],
    }


def make_executor(cfg: Config, name: str, pipeline: list, tasks: int, logs: Path, depends=None):
    ex = cfg.executor
    if ex.kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        workers = ex.workers if tasks > 1 else 1
        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(logs / name),
                                     depends=depends, skip_completed=True)
    if ex.kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        s = ex.slurm
        return SlurmPipelineExecutor(pipeline, tasks=tasks, time=s.time, partition=s.partition,
                                     cpus_per_task=s.cpus_per_task, mem_per_cpu_gb=s.mem_per_cpu_gb,
                                     job_name=f"lmforge-data-{name}", logging_dir=str(logs / name),
                                     env_command=_slurm_env_command(s), sbatch_args=dict(s.sbatch_args) or None,
                                     # datatrove's default qos "normal" would replace a qos given in sbatch_args
                                     qos=None, depends=depends, skip_completed=True)
    _ray_connect(ex.ray)
    return _ray_executor_class()(pipeline, tasks=tasks, workers=ex.workers, logging_dir=str(logs / name),
                                 cpus_per_task=ex.ray.cpus_per_task, mem_per_cpu_gb=ex.ray.mem_per_cpu_gb,
                                 depends=depends, skip_completed=True)


def _slurm_env_command(s: SlurmConfig) -> str:
    """The line a job runs before datatrove's `launch_pickled_pipeline`: the recipe's venv, else this Python's.

    datatrove's own ``venv_path`` is sourced as is (it must name bin/activate), and without one the job
    finds `launch_pickled_pipeline` only if the submitting shell had the venv on PATH. Paths are made
    absolute: a job starts in the submission directory, but a relative venv must not depend on it."""
    import shlex
    import sys

    if s.venv_path:
        v = Path(s.venv_path).expanduser().resolve()
        activate = v / "bin" / "activate" if v.is_dir() else v
        return f"source {shlex.quote(str(activate))}"
    return f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"'


def _ray_connect(rc: RayConfig) -> None:
    """Connect this process to the Ray cluster once (datatrove's executor expects ``ray.init`` done)."""
    import ray

    if ray.is_initialized():
        return
    address = None if rc.address == "local" else rc.address
    target = os.environ.get("RAY_ADDRESS") or (address if address != "auto" else None)
    if address and target and "://" not in target and ":" in target:
        import socket  # ray.init waits for ever on an address where no Ray listens: look first

        host, port = target.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except (OSError, ValueError) as e:
            where = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "executor.ray.address"
            raise UserError(f"{where}: no Ray cluster answers at '{target}' ({e}); start one with "
                            "`ray start --head`, or use ray.address=local for a Ray of this run alone") from None
    try:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING", configure_logging=True)
    except ConnectionError as e:
        raise UserError(f"executor.ray.address: no Ray cluster at '{rc.address}' ({str(e).splitlines()[0]}); "
                        "start one with `ray start --head`, set RAY_ADDRESS, or use ray.address=local") from None


def _ray_executor_class():
    from datatrove.executor import RayPipelineExecutor

    class LmforgeRayExecutor(RayPipelineExecutor):
        """datatrove's Ray executor, stopping instead of waiting forever when a task failed.

        datatrove logs a failed Ray task at debug level and returns; the next executor then polls the
        unfinished dependency every two minutes without end. Here a run that leaves ranks unfinished raises,
        naming the task logs; the finished ranks are kept, so ``resume=auto`` reruns only the failed ones.
        Ray workers start in the directory of their node's `ray start`, not the driver's: each task moves to
        the driver's working directory first, so recipe paths relative to it mean the same in the tasks."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.driver_cwd = os.getcwd()

        def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
            if os.path.isdir(self.driver_cwd):  # a shared filesystem mounted at the same path
                os.chdir(self.driver_cwd)
            return super()._run_for_rank(rank, local_rank, node_rank)

        def run(self):
            super().run()
            failed = self.get_incomplete_ranks(range(self.world_size))
            if not failed:
                return
            problems = []  # a UserError in a task (bad input): said plainly, as the local executor does
            for rank in failed:
                try:
                    with self.logging_dir.open(f"logs/task_{rank:05d}.log", "r") as f:
                        lines = [ln.split("UserError: ", 1)[1].strip() for ln in f if "UserError: " in ln]
                except OSError:
                    lines = []
                problems += [ln for ln in lines[-1:] if ln not in problems]
            if problems:
                raise UserError(problems)
            logs = self.logging_dir.resolve_paths("logs")
            raise RuntimeError(f"data: {len(failed)} of {self.world_size} Ray tasks failed (ranks {failed[:8]}); "
                               f"see {logs}/task_*.log, then rerun with resume=auto")

    return LmforgeRayExecutor


# --------------------------------------------------------------------------------------------
# Checks before anything is written


def check(cfg: Config) -> None:
    """Input files exist and have a known type; the executor's tools are installed (`lmforge check`)."""
    expand_sources(cfg.sources)
    if cfg.executor.kind == "slurm":
        if shutil.which("sbatch") is None:
            raise UserError("executor.kind: slurm, but `sbatch` is not on PATH; run on a Slurm login node or use kind: local")
        v = cfg.executor.slurm.venv_path
        if v and not (Path(v).expanduser() / "bin" / "activate").is_file() and not Path(v).expanduser().is_file():
            raise UserError(f"executor.slurm.venv_path: '{v}' is neither a virtual environment (no bin/activate) "
                            "nor an activate script")
    if cfg.executor.kind == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UserError("executor.kind: ray needs Ray; `pip install -e '.[ray]'` or use kind: local") from None


def _recipe_key(cfg: Config) -> dict:
    d = to_dict(cfg)
    for k in ("resume", "overwrite"):
        d.pop(k, None)
    return d


def prepare_dirs(cfg: Config) -> tuple[Path, Path] | None:
    """(final output_dir, work dir); None when a finished output already exists and resume=auto."""
    out = Path(cfg.output_dir)
    work = out.with_name(out.name + ".partial")
    if out.exists() and any(out.iterdir()):
        if cfg.overwrite:
            outputs.refuse_foreign(out)  # replaced only when the new output is complete (see main)
        elif cfg.resume == "auto" and (out / "report.json").exists():
            if (out / "recipe.yaml").exists():
                diff = outputs.changed_keys(outputs.read_recipe(out / "recipe.yaml"), _recipe_key(cfg), allowed=("resume", "overwrite"))
                if diff:
                    raise UserError(f"resume=auto: '{out}' is complete, but made with another recipe ({', '.join(diff[:8])} "
                                    "differ); rerun with overwrite=true to rebuild it, or choose another output_dir")
            return None
        else:
            raise UserError(f"output_dir: '{out}' is not empty; pass overwrite=true to replace it, "
                            "or choose another output_dir")
    if work.exists():
        saved = work / "recipe.json"
        if cfg.resume == "auto" and saved.exists():
            if json.loads(saved.read_text()) != _recipe_key(cfg):
                raise UserError(f"resume: the recipe changed since the interrupted run in '{work}'; "
                                "rerun with overwrite=true (resume=none) to start over")
            print(f"data: resuming {work} (finished tasks are skipped)")
        else:
            print(f"data: removing the unfinished run in {work} (pass resume=auto to continue it instead)")
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(_recipe_key(cfg), indent=1), encoding="utf-8")
    return out, work


# --------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict | None:
    check(cfg)
    quiet_datatrove()
    dirs = prepare_dirs(cfg)
    if dirs is None:
        print(f"data: {cfg.output_dir} is complete already (report.json present); nothing to do")
        return json.loads((Path(cfg.output_dir) / "report.json").read_text())
    out, work = dirs
    t0 = time.perf_counter()

    # ---- three executors, each waiting for the previous one (datatrove `depends`) ----
    steps = pipelines(cfg, work, str(out))
    logs = work / "logs"
    clean = make_executor(cfg, "clean", steps["clean"], cfg.executor.tasks, logs)
    dedup = make_executor(cfg, "dedup", steps["dedup"], 1, logs, depends=clean)
    publish = make_executor(cfg, "publish", steps["publish"], 1, logs, depends=dedup)
    try:
        with aborts_in_process():
            publish.run()  # runs (local, ray) or submits (slurm) its dependencies first
    except StepAbort as e:  # a UserError inside a block run in this process: print it plainly
        shutil.rmtree(work, ignore_errors=True)  # the input or recipe must change: nothing here can be resumed
        raise UserError(e.problems) from None
    except UserError:  # the same, raised in a worker process (datatrove has logged it there)
        shutil.rmtree(work, ignore_errors=True)
        raise

    # ---- publish: the finished folder appears in one rename ----
    if not (work / "report.json").exists():
        print(f"data: jobs submitted ({cfg.executor.kind}); when they finish, run the same command with resume=auto "
              f"to move {work} to {out}")
        return None
    dump(cfg, work / "recipe.yaml")
    (work / "recipe.json").unlink()
    outputs.mark(work, "data")
    if out.exists():
        if any(out.iterdir()):
            outputs.set_aside(out)  # overwrite=true: the old output stayed whole until the new one was complete
        else:
            out.rmdir()
    work.rename(out)
    outputs.discard_pending(out)
    report = json.loads((out / "report.json").read_text())
    d, t = report["documents"], report["tokens"]
    print(f"\ndata done in {time.perf_counter() - t0:.1f} s: {d['read']} documents read, {d['kept']} kept; "
          f"{t['train']:,} train + {t['validation']:,} validation tokens in {t['block_size']}-token blocks")
    print(f"  dataset:   {out / 'dataset'}")
    if cfg.tokenizer.train:
        print(f"  tokenizer: {out / 'tokenizer'}")
    print(f"  report:    {out / 'report.md'}")
    print(f"  pretrain:  lmforge pretrain recipes/tiny/pretrain.yaml data.path={out / 'dataset'} data.train_files=[] "
          f"data.block_size={t['block_size']}" + (f" model.tokenizer={out / 'tokenizer'}" if cfg.tokenizer.train else ""))
    return report
