r"""ImageNet 2012 with the paper's recipe (Ramachandran et al. 2019, Appendix A.2).

The argument selects the model (any ``config.model`` field; ``width`` and ``stages`` are short
for ``width_multiplier`` and ``attention_stages``):

  python -m sasa_jax.summary --config=configs/imagenet.py:depth=50,variant=full_attention
  python -m sasa_jax.summary --config=configs/imagenet.py:depth=50,stages=34
  python -m sasa_jax.summary --config=configs/imagenet.py:variant=conv_stem_attention,window=11

Variants (Table 1): baseline, conv_stem_attention, full_attention. Other keys: window (Table 4),
attention_stages (Table 3, digits of the attention stages), positional relative|absolute|none
(Table 5), logits qk+qr|qr (Table 6), stem conv|attention and stem_values spatially_aware|
stand_alone|spatial_conv_values (Table 7), width (Fig. 5), border, implementation.

Expected (paper, Table 1, 224x224, 130 epochs): ResNet-50 full attention 77.6% top-1 with
7.2 GFLOPs and 18.0M params; conv-stem + attention 77.4%; baseline 76.9%. The paper trained on
128 TPUv3 cores at batch 4096; no time on this project's hardware has been measured. Any field
can be overridden with --config.FIELD=VALUE.
"""

from sasa_jax.train import config as config_lib


def get_config(arg: str | None = None):
    config = config_lib.default_config()
    config.dataset = "imagenet2012"
    config.image_size = 224
    config.batch_size = 4096
    config.eval_batch_size = 1024
    config.num_epochs = 130
    config.warmup_epochs = 10
    config.base_learning_rate = 0.1  # 1.6 at batch 4096
    config.nesterov = True
    config.momentum = 0.9
    config.weight_decay = 1e-4  # not stated in the paper
    config.label_smoothing = 0.1  # not stated in the paper
    config.ema_decay = 0.9999
    config.model.bn_momentum = 0.9999
    config.half_precision = True
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    config.model.num_classes = 1000
    return config_lib.apply_model_arg(config, arg)
