"""The driver: runs the stages in order, skips the done ones, re-runs a stale stage and all after it."""

from __future__ import annotations

import gc
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline import checkpoints, nodes, preflight, run_lock, tracking
from pipeline import config as config_lib
from pipeline.dist import barrier, empty_cache, get_logger, is_main, leave_process_group, on_cpu, rank, world_size
from pipeline.layout import RunLayout
from pipeline.stage import (
    MANIFEST,
    RANKS,
    Stage,
    WriteFailed,
    describe_rank_failures,
    fingerprint,
    is_done,
    read_manifest,
    write_atomic,
    write_failure,
    write_manifest,
    write_rank_status,
)
from pipeline.stages import eval as eval_stage
from pipeline.stages import finalize, finetune, merge, prep, salience
from pipeline.summary import run_summary

STAGES: tuple[Stage, ...] = (
    Stage("prep", prep.Config, (), prep.run, outputs=("tokenizer", "dataset", "heldout.jsonl")),
    Stage("finetune", finetune.Config, ("prep",), finetune.run, distributed=True,
          outputs=("adapters.safetensors", "apt_state.safetensors", "apt_state.json")),
    Stage("salience", salience.Config, ("finetune",), salience.run, distributed=True,
          outputs=("salience.safetensors",)),
    Stage("finalize", finalize.Config, ("finetune", "salience"), finalize.run, outputs=("masks.safetensors",)),
    Stage("merge", merge.Config, ("prep", "finetune", "finalize"), merge.run, outputs=("model",)),
    Stage("eval", eval_stage.Config, ("prep", "merge"), eval_stage.run, outputs=("metrics.json",)),
)
"""The chain. `outputs` are what later stages (and the user) read; docs/design.md §1 lists the files."""
CPU_RANK_ENV = {
    # glibc raises its mmap threshold each time a large block is freed; after that, the weights ZeRO-3 gathers and
    # frees every step stay in the heap and a rank's resident memory creeps up (1.6x the plan after 4 steps at
    # 0.66 B parameters, bench/scale). A fixed threshold hands every block of 128 KiB or more back when freed.
    "MALLOC_MMAP_THRESHOLD_": "131072",
}
"""Environment of CPU ranks (set unless the user set it), beside OMP_NUM_THREADS."""
RESUME_KEY = ".fingerprint"
"""Inside a resumable stage's folder: the fingerprint its checkpoints belong to."""

log = get_logger("apt.run")


class StageFailed(RuntimeError):
    """A stage stopped with an error the message explains (which rank, which file, what to do); no traceback."""


def stage_by_name(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ValueError(f"unknown stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")


def expected_fingerprint(stage: Stage, cfg: config_lib.RunConfig, run_dir: Path,
                         planned: dict[str, str] | None = None) -> str:
    """The fingerprint this config gives `stage`, from its sections and its inputs' manifests (or, for an input
    launched with it, `planned`: the fingerprint that input is about to get)."""
    inputs = {}
    for name in stage.inputs:
        if planned and name in planned:
            inputs[name] = planned[name]
            continue
        manifest = read_manifest(run_dir / name)
        if manifest is None:
            raise RuntimeError(f"stage {stage.name} needs {name}'s output; run stage {name} first")
        inputs[name] = manifest["fingerprint"]
    sections = cfg.fingerprint_sections(*stage.sections)
    return fingerprint(sections, inputs)


def run_pipeline(cfg: config_lib.RunConfig, *, from_stage: str | None = None) -> None:
    """Run every stage that is not done (or every stage from `from_stage` on)."""
    if from_stage is not None:
        stage_by_name(from_stage)
    preflight.check(cfg)  # bad inputs fail here, before the run directory exists
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock.hold(run_dir):
        write_atomic(run_dir / "config.yaml", config_lib.dump(cfg))
        log.info("run directory: %s", run_dir)
        run_stages(cfg, run_dir, from_stage)


def run_stages(cfg: config_lib.RunConfig, run_dir: Path, from_stage: str | None) -> None:
    """Every stage that is not done, in order, each tracked in the run's MLflow run; then the run's summary."""
    with tracking.pipeline_run(cfg) as mlflow_run:  # rank 0's MLflow run; stages only write metrics.jsonl
        for stages, stage_cfg, runs in plan_steps(cfg, run_dir, from_stage):
            if not runs:
                log.info("%-9s done, skipped", stages[0].name)
                tracking.record_skipped(mlflow_run, run_dir / stages[0].name)
                continue
            with tracking.tracked_stages(mlflow_run, [run_dir / stage.name for stage in stages]):
                run_step(stages, stage_cfg, run_dir)
        export = RunLayout(run_dir).export
        mlflow_run.set_tag("export_path", str(export.resolve()))
    summary = run_summary(run_dir, cfg.model.path or "a model built from the model section")
    log.info("%s", summary or f"done: the pruned model is in {export} (loads with "
             f"AutoModelForCausalLM.from_pretrained)")


def plan_stages(cfg: config_lib.RunConfig, run_dir: Path, from_stage: str | None = None,
                configs: dict[str, config_lib.RunConfig] | None = None):
    """Each stage in order as (stage, its config, whether it runs): a stage runs when it is not done with this config
    (or is `from_stage`), and so does every stage after it, which consumed its old outputs. `configs` gives some
    stages a config of their own. Lazy: run a stage before asking for the next, whose fingerprint reads its inputs."""
    runs = False
    for stage in STAGES:
        stage_cfg = (configs or {}).get(stage.name, cfg)
        runs = runs or stage.name == from_stage or not is_done(
            run_dir / stage.name, expected_fingerprint(stage, stage_cfg, run_dir), stage.outputs)
        yield stage, stage_cfg, runs


def plan_steps(cfg: config_lib.RunConfig, run_dir: Path, from_stage: str | None = None,
               configs: dict[str, config_lib.RunConfig] | None = None):
    """`plan_stages` as steps (stages, config, whether they run): distributed stages that run one after the other
    under one config share a step, one launch, so their ranks start once (interpreter, imports, process group).
    Every stage after one that runs runs too, so a step is yielded before any later fingerprint is read."""
    joined, joined_cfg = (), None
    for stage, stage_cfg, runs in plan_stages(cfg, run_dir, from_stage, configs):
        if joined and not (runs and stage_cfg is joined_cfg and shares_launch(joined, stage)):
            yield joined, joined_cfg, True
            joined = ()
        if runs and stage.distributed:
            joined, joined_cfg = (*joined, stage), stage_cfg
        else:
            yield (stage,), stage_cfg, runs
    if joined:
        yield joined, joined_cfg, True


def shares_launch(step: tuple[Stage, ...], stage: Stage) -> bool:
    """A distributed stage right after a distributed one joins its launch."""
    return step[-1].distributed and stage.distributed


def run_step(stages: tuple[Stage, ...], cfg: config_lib.RunConfig, run_dir: Path) -> dict[str, dict]:
    """Run one step: a single-process stage here, distributed stages through one `deepspeed` launch. Returns each
    stage's summary."""
    if stages[0].distributed:
        return launch(stages, cfg, run_dir)
    return {stages[0].name: execute_stage(stages[0], cfg, run_dir)}


def steps_of(stages: tuple[Stage, ...]) -> list[tuple[Stage, ...]]:
    """Named stages as steps: distributed ones next to each other share a launch."""
    steps: list[tuple[Stage, ...]] = []
    for stage in stages:
        if steps and shares_launch(steps[-1], stage):
            steps[-1] += (stage,)
        else:
            steps.append((stage,))
    return steps


def run_stage(stage: Stage, cfg: config_lib.RunConfig, run_dir: Path) -> dict:
    """Run one stage (a step of its own); its summary."""
    return run_step((stage,), cfg, run_dir)[stage.name]


def execute_launched(stages: tuple[Stage, ...], cfg: config_lib.RunConfig, run_dir: Path) -> None:
    """What every rank of a launch runs: its stages in order. Before the next one, the last one's engine goes (its
    memory back to the accelerator) and every rank waits for the others: the next fingerprint reads the manifest
    rank 0 wrote last."""
    for index, stage in enumerate(stages):
        if index:
            gc.collect()  # a DeepSpeed engine holds reference cycles (hooks, optimizer)
            empty_cache()
            barrier()
        execute_stage(stage, cfg, run_dir)
    leave_process_group()


def execute_stage(stage: Stage, cfg: config_lib.RunConfig, run_dir: Path) -> dict:
    """Run the stage body in this process (on every rank of a distributed stage); rank 0 writes the manifest last."""
    stage_dir = run_dir / stage.name
    fp = expected_fingerprint(stage, cfg, run_dir)
    if is_main():
        (stage_dir / MANIFEST).unlink(missing_ok=True)
        if not stage.distributed:  # a resumable stage keeps its checkpoints; the others start clean
            shutil.rmtree(stage_dir, ignore_errors=True)
        stage_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if stage.distributed:
        write_rank_status(stage_dir, rank(), "running")
    try:
        summary = stage.run(cfg.select(stage.config), run_dir)
    except BaseException as e:
        failure = write_failure(e, stage_dir)
        if stage.distributed:
            write_rank_status(stage_dir, rank(), "failed", failure_detail(e, failure))
        elif failure is not None:  # a full disk or a file-size limit: the message says all, a traceback nothing
            raise StageFailed(f"stage {stage.name} failed: {failure}\nDone stages stay done; running the same "
                              f"command again starts at this one.") from e
        raise
    if stage.distributed:
        write_rank_status(stage_dir, rank(), "done")
    if is_main():
        inputs = {name: read_manifest(run_dir / name)["fingerprint"] for name in stage.inputs}
        write_manifest(stage_dir, stage=stage.name, fingerprint=fp, inputs=inputs, world_size=world_size(),
                       started=started, summary=summary)
        figures = " ".join(f"{k}={v}" for k, v in summary.items())
        log.info("%-9s done in %.1fs: %s", stage.name, time.time() - started, figures)
    return summary


def failure_detail(error: BaseException, failure: WriteFailed | None) -> str:
    """One line for a rank's status file: the error, plus the cause and fix when it was a refused write."""
    detail = f"{type(error).__name__}: {error}"
    if failure is None or failure is error:
        return detail
    return f"{detail} -- {failure.fix}"


def launch(stages: tuple[Stage, ...], cfg: config_lib.RunConfig, run_dir: Path) -> dict[str, dict]:
    """Start the stages on every rank with one `deepspeed` launch, wait, and check each one's manifest."""
    fingerprints: dict[str, str] = {}
    for stage in stages:
        fingerprints[stage.name] = expected_fingerprint(stage, cfg, run_dir, fingerprints)
        prepare_launched_stage(run_dir / stage.name, fingerprints[stage.name])
    config_path = run_dir / "config.yaml"
    write_atomic(config_path, config_lib.dump(cfg))
    names = [stage.name for stage in stages]
    command = deepspeed_command(cfg.deepspeed, names, config_path)
    log.info("%-9s launching: %s", ", ".join(names), shlex.join(command))
    started = time.time()
    env = rank_environment(cfg.deepspeed.num_gpus)
    if cfg.deepspeed.hostfile is None:
        code = run_launcher(command, env)
    else:  # the runner reads DS_ENV_FILE once, when imported: a launch with its own environment file is a command
        # Ranks on the hosts of a hostfile start in a fresh login shell: the settings travel in a .deepspeed_env.
        with nodes.node_env(env) as env:
            code = subprocess.run(command, env=env).returncode
    summaries = {}
    for stage in stages:
        manifest = read_manifest(run_dir / stage.name)
        if code != 0 and (manifest is None or stage == stages[-1]):
            raise launch_failed(stage, cfg, run_dir / stage.name, code)
        if manifest is None or manifest["fingerprint"] != fingerprints[stage.name]:
            raise RuntimeError(f"stage {stage.name} exited cleanly but left no manifest in {run_dir / stage.name}")
        summaries[stage.name] = manifest["summary"]
    log.info("%-9s finished in %.1fs", ", ".join(names), time.time() - started)
    return summaries


def run_launcher(command: list[str], env: dict[str, str]) -> int:
    """Run `command` (`deepspeed ARGS` on this node, as logged) with DeepSpeed's runner in this process, which has
    imported DeepSpeed already: an interpreter start and DeepSpeed's import fewer per launch (about 6 s on 2 cores).
    The runner starts the node's launcher as its own command would, in `env`. Its exit status."""
    from deepspeed.launcher import runner

    saved_env, saved_handlers = dict(os.environ), {sig: signal.getsignal(sig) for sig in (signal.SIGINT,
                                                                                           signal.SIGTERM)}
    os.environ.clear()  # the runner hands os.environ to the launchers it starts
    os.environ.update(env)
    try:
        runner.main(command[1:])
        return 0
    except SystemExit as stop:  # the runner exits with its launcher's status (None: success)
        return 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
    except (RuntimeError, ValueError, OSError) as error:  # the runner's own checks (e.g. no device to run on)
        log.error("the DeepSpeed launcher did not start: %s", error)
        return 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for sig, handler in saved_handlers.items():  # the runner may install its own
            signal.signal(sig, handler)


def prepare_launched_stage(stage_dir: Path, fp: str) -> None:
    """Before a launch: no manifest, checkpoints of another config gone, a truncated or unsafe one refused before
    any rank starts, no rank status left from an earlier attempt."""
    (stage_dir / MANIFEST).unlink(missing_ok=True)
    key = stage_dir / RESUME_KEY
    if key.is_file() and key.read_text() != fp:
        log.info("%s: config changed since its checkpoints were written; starting it over", stage_dir.name)
        shutil.rmtree(stage_dir)
    checkpoints.check_checkpoint(stage_dir / checkpoints.FOLDER)
    stage_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(stage_dir / RANKS, ignore_errors=True)
    write_atomic(key, fp)


def launch_failed(stage: Stage, cfg: config_lib.RunConfig, stage_dir: Path, code: int) -> StageFailed:
    """The error of a launch that exited non-zero, named after the first stage it did not finish."""
    ranks = describe_rank_failures(stage_dir) or "no rank recorded a failure (the launcher itself failed?)"
    again = "Running the same command again resumes it from its last checkpoint"
    if cfg.deepspeed.hostfile is not None:
        again += (", also with a lost host left out of deepspeed.hostfile and deepspeed.num_nodes lowered (a "
                  "checkpoint resumes on another number of ranks)")
    return StageFailed(f"stage {stage.name} failed (launcher exit code {code}):\n{ranks}\n{again}.")


def rank_environment(ranks_per_node: int) -> dict[str, str]:
    """The launcher's environment: this one, the interpreter's folder first on PATH, plus thread and allocator
    settings for CPU ranks (a user's own win)."""
    env = os.environ.copy()
    # The tools beside the interpreter come first, ninja above all: DeepSpeed builds its ops on first use, and two
    # ninja versions (the venv's, the system's) on different ranks or nodes would rebuild them over each other.
    path = [str(Path(sys.executable).parent), *env.get("PATH", "").split(os.pathsep)]
    env["PATH"] = os.pathsep.join(dict.fromkeys(entry for entry in path if entry))
    if on_cpu():  # CPU ranks share the cores; oversubscribed BLAS threads make steps erratic
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks_per_node)))
        for name, value in CPU_RANK_ENV.items():
            env.setdefault(name, value)
    return env


def deepspeed_command(section: config_lib.DeepSpeedSection, stage_names: list[str], config_path: Path) -> list[str]:
    """The launcher command line for distributed stages; it is logged so a user can rerun it by hand."""
    launcher = Path(sys.executable).with_name("deepspeed")
    command = [str(launcher) if launcher.exists() else "deepspeed",
               "--num_nodes", str(section.num_nodes), "--num_gpus", str(section.num_gpus),
               "--master_port", str(section.master_port), "--no_local_rank"]
    if section.hostfile is not None:
        command += ["--hostfile", section.hostfile, *nodes.launcher_args(section)]
    command += [*section.launcher_args, "--module", "pipeline.cli", "stage", *stage_names, "--worker",
                "--config", str(config_path)]
    return command
