"""What a SLURM run would ask of sbatch, job by job, before anything is submitted.

Plans the run as `snakemake --dry-run` with the SLURM workflow profile (and any further Snakemake
arguments given after `--`), then prints one row per kind of sbatch job: the rule or group job
(and the steps it runs), how many there are and the options snakemake-executor-plugin-slurm
would give sbatch for them: --cpus-per-task, --mem (MB), -t (minutes), --gpus, -p (partition)
and -A (account) where the profile sets them. Run it from the repository root, as Snakemake.

Examples:
  msamil cluster-preview                                   # the config's cohort, what is left to run
  msamil cluster-preview -- --config slides=cohort.csv     # another sheet
  msamil cluster-preview -- --forceall                     # every job, also those done
"""

from __future__ import annotations

import argparse

HELP = "print what each sbatch job of a SLURM run would ask for (a dry run; nothing is submitted)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="workflow/profiles/slurm",
                        help="the SLURM workflow profile (default %(default)s)")
    parser.add_argument("snakemake_args", nargs=argparse.REMAINDER, metavar="-- SNAKEMAKE_ARG",
                        help="further Snakemake arguments (--configfile, --config, --directory, targets)")


def run(args: argparse.Namespace) -> None:
    from ..cluster_preview import format_plan, plan

    extra = args.snakemake_args[1:] if args.snakemake_args[:1] == ["--"] else args.snakemake_args
    print(format_plan(plan(["--workflow-profile", args.profile, *extra])))
