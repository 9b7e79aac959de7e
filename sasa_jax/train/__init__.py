"""Training (layer 5): the config (``config``), the train state and steps (``steps``), the
resumable loop over a device mesh (``loop``), checkpoints, the workdir's run record and metrics.
``python -m sasa_jax.train`` is the command line (``__main__``)."""

# The command's exit statuses besides 0 (trained to the end): a config or data error, and a run
# a signal stopped with a checkpoint, which the same command resumes (EX_TEMPFAIL, as schedulers
# that requeue temporary failures read it).
EXIT_CONFIG_ERROR = 2
EXIT_STOPPED = 75
