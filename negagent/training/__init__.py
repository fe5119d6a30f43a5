"""Training: a trajectories file and a tagging strategy -> a fine-tuned adapter or model in a run
directory (entry point train.py).

    data.py              trajectories -> tagged, rendered samples + manifest; train/test overlap
    batching.py          micro-batch plans (grouped / packed / padded) and their tensors
    loss.py              weighted next-token loss with an explicit normaliser (token_mean / seq_mean)
    deepspeed_config.py  DeepSpeed JSON from the `trainer` config
    recipe.py            the recipe on the HF Trainer + peft: settings, resume, verified save, summary
    checkpoint.py        gathered, reloaded and checksummed final weights
    launch.py            torchrun ranks that read the frozen config; run-directory state checks
    tracking.py          metrics.jsonl and wandb; secrets redacted from logged configs

May import the core (render, tagging, trajectory, tasks, models, rundir, config); never collection,
evaluation or report (train.py calls those stages itself).
"""
