"""``python train.py ...`` in a checkout: the same as ``python -m sasa_jax.train ...``."""

from absl import app

from sasa_jax.train.__main__ import main

if __name__ == "__main__":
    app.run(main)
