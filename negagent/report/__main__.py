"""`python -m negagent.report ...`: see negagent.report."""

from negagent.report.runs import main

main()
