"""Reports: tables, plots and paired comparisons over finished runs and sweeps.

    python -m negagent.report <sweep or run dirs> [--out DIR] [--compare RUN_A RUN_B]

    runs.py            find runs, read their coordinates and metrics; report.md/csv, plots, comparisons
    strategy_table.py  strategies pooled over seeds with intervals and control strength

Reads run directories through negagent.rundir and statistics from negagent.metrics; never imports
the stages that wrote them.
"""

from negagent.report.runs import build_report, main

__all__ = ["build_report", "main"]
