"""`apt-pipeline`: the command line."""

from __future__ import annotations

import argparse
import sys

from pipeline import config as config_lib
from pipeline import plan as planner
from pipeline import preflight, run_lock
from pipeline import run as driver

DESCRIPTION = """APT (Adaptive Pruning and Tuning) for LLaMA-family models under DeepSpeed.
Every command takes the run config as YAML (--config) plus dotted overrides such as
train.lr=1e-4 or data.seq_len=256; without --config the embedded tiny defaults are used."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apt-pipeline", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run every stage that is not done yet, in order",
                              description="Run the pipeline: done stages are skipped, a stale stage and every "
                                          "stage after it run again.")
    run.add_argument("--config", help="run config YAML (default: the embedded tiny defaults)")
    run.add_argument("--from", dest="from_stage", metavar="STAGE", help="re-run this stage and every later one")
    run.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")

    stage = commands.add_parser("stage", help="run stages (their inputs must be done)",
                                description="Run the named stages in order and write their manifests, whether or "
                                            "not they are done; distributed ones named together share a launch.")
    stage.add_argument("overrides", nargs="+", metavar="NAME [NAME ...] [section.key=value ...]",
                       help=f"stages ({', '.join(s.name for s in driver.STAGES)}), then config overrides")
    stage.add_argument("--config", help="run config YAML (default: the embedded tiny defaults)")
    stage.add_argument("--worker", action="store_true",
                       help="run the stages' bodies in this process: what each rank started by the launcher does")

    plan = commands.add_parser("plan", help="per-GPU memory for a model x ZeRO stage x world size",
                               description="Print per-GPU memory of an APT finetune (frozen bf16 base, adapter "
                                           "states from DeepSpeed's estimators, activations) as a markdown table.")
    planner.add_arguments(plan)

    # Overrides may come before or after options; argparse leaves the later ones unparsed.
    args, extra = parser.parse_known_args(argv)
    unknown_options = [a for a in extra if a.startswith("-")]
    if unknown_options or (args.command == "plan" and extra):
        parser.error(f"unrecognized arguments: {' '.join(unknown_options or extra)}")
    if args.command == "plan":
        return planner.main(args)
    if args.command == "stage":
        stages = stage_names(parser, args)
    try:
        cfg = config_lib.load(args.config, [*args.overrides, *extra])
        if args.command == "run":
            driver.run_pipeline(cfg, from_stage=args.from_stage)  # checks the inputs first
        elif args.worker:  # a rank started by the launcher: the driver checked the inputs
            driver.execute_launched(stages, cfg, cfg.run_dir)
        else:
            preflight.check(cfg, tracking_server=False)  # stages alone log to metrics.jsonl only
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            with run_lock.hold(cfg.run_dir):
                for step in driver.steps_of(stages):
                    driver.run_step(step, cfg, cfg.run_dir)
    except (config_lib.ConfigError, run_lock.RunLocked) as e:  # refused at start-up: the message says why
        print(f"apt-pipeline: {e}", file=sys.stderr)
        return 2
    except driver.StageFailed as e:  # a rank died or a write was refused: the message names it and the fix
        print(f"apt-pipeline: {e}", file=sys.stderr)
        return 1
    return 0


def stage_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple:
    """The stages `stage` names (its leading arguments without "="); the rest stay overrides."""
    count = next((i for i, arg in enumerate(args.overrides) if "=" in arg), len(args.overrides))
    names, args.overrides = args.overrides[:count], args.overrides[count:]
    known = [stage.name for stage in driver.STAGES]
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        parser.error(f"stage: {'unknown stage ' + ', '.join(unknown) if unknown else 'name a stage'}; "
                     f"stages: {', '.join(known)}")
    return tuple(driver.stage_by_name(name) for name in names)


if __name__ == "__main__":
    sys.exit(main())
