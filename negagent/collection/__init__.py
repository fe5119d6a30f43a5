"""Collection: a teacher answers a task's training questions through the shared agent loop, and
the labelled episodes become a training file (`collect.py`; entry point generate.py).

Owns: the sampling protocol (temperatures, samples per question, which episodes are kept), resume
of a collection directory, collection statistics. May import the core (agent, trajectory, render,
tasks, tools, backends, model_source, rundir); never training, evaluation or report.
"""
