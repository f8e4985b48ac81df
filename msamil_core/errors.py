"""User-facing errors.

An expected failure (missing file, unreadable slide, missing mpp, bad sheet row)
raises :class:`MsamilError` with a message that names the slide or file, what is
wrong and what to do. The command line prints that one line and exits with
status 1 instead of a traceback; Snakemake then fails only that job.
"""


class MsamilError(Exception):
    """An expected, user-fixable failure; the message is shown as is."""


class SlideDataError(MsamilError):
    """A slide whose file opens but whose pixels cannot be had (tiles that fail to decode): the
    slide is unusable, not the run. The workflow's extraction (``msamil extract --leave-out-unreadable``)
    records it in the slide's bags, and the cohort steps leave the slide out as the screening does."""
