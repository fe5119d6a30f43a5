"""negagent: fine-tune LLM agents on successful and failed trajectories (Negative-Aware Training)."""

__version__ = "0.1.0"
