"""What a SLURM run would ask of `sbatch`, job by job, without submitting anything.

Snakemake plans the run as a dry run with the given arguments (the SLURM workflow profile among
them) and this module records each job or group job its scheduler hands out; the sbatch options
are then built by snakemake-executor-plugin-slurm's own functions from each job's resources, so
they are the ones the plugin would use. Two things differ from a real SLURM run and are put
back: a dry run counts its jobs as local (a group's resources are then added up over its steps,
not the largest step taken) and gives Snakemake one core (which would cap every job's threads),
where a SLURM run has no core limit unless `--cores` is given.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shlex
import sys
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace

from .errors import MsamilError

# sbatch arguments that name the submission (job name, log, comment, folder), not what it asks for
_BOOKKEEPING = {"--job-name", "--output", "--comment", "-D"}
_FLAGS = {"--parsable", "--export=ALL"}


@dataclass(frozen=True)
class Submission:
    """One sbatch call of the run: a rule's job, or a group job (`group` its name)."""

    name: str  # the rule, or the group (slide_prep, slide_features, slide_masks)
    group: bool
    steps: tuple[tuple[str, int], ...]  # (rule, jobs) run in it
    options: str  # the sbatch options about resources: --cpus-per-task, --mem, -t, --gpus, -p, -A


def _sbatch_options(job, resources, threads: int) -> str:
    """The resource part of the plugin's sbatch call for a job with these resources."""
    try:
        from snakemake_executor_plugin_slurm.submit_string import get_submit_command
        from snakemake_executor_plugin_slurm.utils import set_gres_string
    except ImportError:
        raise MsamilError("the SLURM executor is not installed: pip install -e '.[slurm]'") from None

    partition = resources.get("slurm_partition")
    account = resources.get("slurm_account")
    submitted = SimpleNamespace(resources=resources, threads=threads, name=job.name, is_group=job.is_group)
    params = {
        "run_uuid": "RUN", "slurm_logfile": "LOG", "comment_str": "COMMENT", "workdir": None,
        # the plugin picks the cluster's default partition and guesses the account when unset
        "partition": f" -p {shlex.quote(str(partition))}" if partition else "",
        "account": f" -A {shlex.quote(str(account))}" if account else "",
    }
    words = shlex.split(get_submit_command(submitted, params) + set_gres_string(submitted))[1:]
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in _BOOKKEEPING:
            skip = True
        elif word not in _FLAGS:
            kept.append(word)
    return shlex.join(kept)


def _is_local(job) -> bool:
    """Whether the job runs in the Snakemake process (localrules, rules without a command), as
    `Workflow.is_local` decides outside a dry run (in one, every job counts as local)."""
    rule = job.rule
    return rule.group is None and (rule.name in rule.workflow._localrules or rule.norun)


def _group_resources(group):
    """A group job's resources as a SLURM run reckons them (`GroupJob.resources` with
    run_local=False): the widest layer of steps run side by side within the limits of local
    scope (`resources:` of the profile), runtimes added up over the layers run one after another."""
    from snakemake.iocontainers import ResourceList
    from snakemake.resources import GroupResources

    return ResourceList(fromdict=GroupResources.basic_layered(
        toposorted_jobs=group.toposorted, constraints=group.global_resources, run_local=False,
        additive_resources=["runtime"], sortby=["runtime"],
    ))


def plan(snakemake_args: list[str]) -> list[Submission]:
    """Every sbatch call a SLURM run with these Snakemake arguments would make, in the order a
    dry run hands the jobs out (the screening checkpoint's slides forecast as the workflow's
    dry runs do). Raises MsamilError when the dry run fails."""
    from snakemake import cli
    from snakemake.executors import dryrun

    args = list(snakemake_args)
    if not {"-c", "--cores"} & {a.split("=")[0] for a in args}:
        args += ["--cores", str(sys.maxsize)]  # a SLURM run's: no limit on threads
    seen = []
    run_job = dryrun.Executor.run_job

    def record(executor, job):
        seen.append(job)
        return run_job(executor, job)

    dryrun.Executor.run_job = record
    said = io.StringIO()  # Snakemake's listing of the dry run, shown only when it fails
    quiet = logging.getLogger("snakemake")  # not through msamil's own log handler either
    propagate, quiet.propagate = quiet.propagate, False
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            parser, parsed = cli.parse_args(["--dry-run", *args])
            ok = cli.args_to_api(parsed, parser)
    finally:
        dryrun.Executor.run_job = run_job
        quiet.propagate = propagate
    if not ok:
        sys.stderr.write(said.getvalue()[-4000:])
        raise MsamilError("the dry run failed (the end of Snakemake's output is above)")

    submissions = []
    for job in seen:
        if job.is_group():
            resources = _group_resources(job)
            steps = Counter(j.rule.name for j in job.jobs)
            submissions.append(Submission(job.groupid, True, tuple(sorted(steps.items())),
                                          _sbatch_options(job, resources, resources["_cores"])))
        elif not _is_local(job):
            submissions.append(Submission(job.rule.name, False, ((job.rule.name, 1),),
                                          _sbatch_options(job, job.resources, job.threads)))
    return submissions


def format_plan(submissions: list[Submission]) -> str:
    """A table: one row per kind of sbatch call (name, steps, options) with how many there are,
    then the totals."""
    rows = Counter((s.name, s.group, s.steps, s.options) for s in submissions)
    lines = ["jobs  sbatch job                                  asks for (sbatch options)"]
    for (name, group, steps, options), n in rows.items():
        what = f"group {name}: " + ", ".join(f"{k} x{v}" for k, v in steps) if group else name
        lines.append(f"{n:>4}  {what:<42}  {options}")
    gpus = sum(n for (_, _, _, options), n in rows.items() if "--gpus" in options)
    grouped = sum(n for (_, group, _, _), n in rows.items() if group)
    lines.append(f"{len(submissions)} sbatch jobs ({grouped} group jobs), {gpus} of them with a GPU; "
                 "local rules run in the Snakemake process")
    return "\n".join(lines)
