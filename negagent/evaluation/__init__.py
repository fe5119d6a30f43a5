"""Evaluation: a model (a training run, a base model, an API model) on a task's test sets through
the shared agent loop, with the paper's metrics (entry point evaluate.py).

    evaluator.py   episodes, resume per episode, metrics.json (statistics from negagent.metrics)
    baseline.py    the base model beside a trained one (train.py's `eval.compare_base`)

May import the core (agent, render, tagging, metrics, model_source, backends, tasks, tools, rundir);
never collection, training or report. `score`, `evaluate` and `evaluate_run` are its public API.
"""

from negagent.evaluation.evaluator import evaluate, evaluate_run, score

__all__ = ["evaluate", "evaluate_run", "score"]
