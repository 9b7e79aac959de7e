r"""Your own images: DIR/<class>/* or DIR/{train,test|validation}/<class>/*.

The argument is the folder, then optionally model fields as for configs/imagenet.py:
``--config=configs/image_folder.py:DIR,variant=baseline,window=3``. Without split folders,
~10% of the files (chosen by a hash of their path) are held out as test. Images are resized
to 32x32 by default; set --config.image_size for larger ones (the attention stages need it to
be a multiple of 32).

  python benchmarks/make_patches.py --out /tmp/patches     # 1,020 patches, 6 classes
  python train.py --config=configs/image_folder.py:/tmp/patches --workdir=/tmp/wd_patches

Expect on those patches about 0.98 test top-1 (92 held-out patches; 0.978 measured
2026-12-04) in about a minute on a 2-core CPU (the README's results table).
"""

from sasa_jax.train import config as config_lib


def get_config(arg: str | None = None):
    folder, model_arg = config_lib.split_path_arg(arg)
    if not folder:
        raise ValueError("give the image folder: --config=configs/image_folder.py:/path/to/images")
    config = config_lib.default_config()
    config.dataset = "image_folder"
    config.image_folder = folder
    config.image_size = 32
    config.batch_size = 64
    config.eval_batch_size = 64
    config.num_epochs = 30
    config.warmup_epochs = 1
    config.base_learning_rate = 0.4
    config.weight_decay = 5e-5
    config.label_smoothing = 0.1
    config.crop_area_min = 0.35
    config.random_flip = True
    config.eval_crop_fraction = 1.0
    config.log_every_steps = 20
    config.eval_every_steps = -1
    config.checkpoint_every_steps = 200
    config_lib.small_model(config)
    return config_lib.apply_model_arg(config, model_arg)
