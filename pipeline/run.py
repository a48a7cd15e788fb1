"""The driver: runs the stages in order, skips the done ones, re-runs a stale stage and all after it."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from pipeline import config as config_lib
from pipeline.dist import get_logger, world_size
from pipeline.stage import MANIFEST, Stage, fingerprint, is_done, read_manifest, write_atomic, write_manifest
from pipeline.stages import prep

STAGES: tuple[Stage, ...] = (
    Stage("prep", prep.SECTIONS, (), prep.run),
)

log = get_logger("apt.run")


def stage_by_name(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ValueError(f"unknown stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")


def expected_fingerprint(stage: Stage, cfg: config_lib.RunConfig, run_dir: Path) -> str:
    """The fingerprint this config gives `stage`, from its sections and its inputs' manifests."""
    inputs = {}
    for name in stage.inputs:
        manifest = read_manifest(run_dir / name)
        if manifest is None:
            raise RuntimeError(f"stage {stage.name} needs {name}'s output; run stage {name} first")
        inputs[name] = manifest["fingerprint"]
    sections = {name: dataclasses.asdict(getattr(cfg, name)) for name in stage.sections}
    return fingerprint(sections, inputs)


def run_pipeline(cfg: config_lib.RunConfig, *, from_stage: str | None = None) -> None:
    """Run every stage that is not done (or every stage from `from_stage` on)."""
    if from_stage is not None:
        stage_by_name(from_stage)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", config_lib.dump(cfg))
    log.info("run directory: %s", run_dir)
    rerun_rest = False
    for stage in STAGES:
        rerun_rest = rerun_rest or stage.name == from_stage
        if not rerun_rest and is_done(run_dir / stage.name, expected_fingerprint(stage, cfg, run_dir)):
            log.info("%-9s done, skipped", stage.name)
            continue
        rerun_rest = True  # what comes after a re-run stage consumed its old outputs
        run_stage(stage, cfg, run_dir)


def run_stage(stage: Stage, cfg: config_lib.RunConfig, run_dir: Path) -> dict:
    """Run one stage in this process and write its manifest last."""
    stage_dir = run_dir / stage.name
    fp = expected_fingerprint(stage, cfg, run_dir)
    (stage_dir / MANIFEST).unlink(missing_ok=True)
    if not stage.distributed:  # a resumable stage keeps its checkpoints; the others start clean
        shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    summary = stage.run(cfg.select(*stage.sections), run_dir)
    inputs = {name: read_manifest(run_dir / name)["fingerprint"] for name in stage.inputs}
    write_manifest(stage_dir, stage=stage.name, fingerprint=fp, inputs=inputs, world_size=world_size(),
                   started=started, summary=summary)
    figures = " ".join(f"{k}={v}" for k, v in summary.items())
    log.info("%-9s done in %.1fs: %s", stage.name, time.time() - started, figures)
    return summary
