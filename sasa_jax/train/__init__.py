"""Training (layer 5): the config (``config``), the train state and steps (``steps``), the
resumable loop over a device mesh (``loop``), checkpoints, the workdir's run record and metrics.
``python -m sasa_jax.train`` is the command line (``__main__``)."""

# The command's exit status for a run a signal stopped with a checkpoint, which the same command
# resumes (EX_TEMPFAIL, as schedulers that requeue temporary failures read it). A config or data
# error exits with sasa_jax.cli.EXIT_USER_ERROR (2); a run trained to the end with 0.
EXIT_STOPPED = 75
