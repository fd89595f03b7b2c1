"""Entry point: python main.py --config CONFIG_FILE --workdir DIR --mode train|eval|sample [--config.FIELD=VALUE].

Data-parallel on G GPUs (every mode): torchrun --nproc_per_node=G main.py ... --mode train|eval|sample.
"""

import logging
import os

import torch
from absl import app, flags
from ml_collections.config_flags import config_flags

import distributed
import run_lib

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file("config", None, "Training configuration.", lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory.")
flags.DEFINE_enum("mode", None, ["train", "eval", "sample"], "Running mode: train, eval or sample.")
flags.DEFINE_string("eval_folder", "eval", "The folder name for storing evaluation results.")
flags.DEFINE_string("device", None, "Device override, e.g. 'cpu' or 'cuda:1' (default: CUDA when available).")
flags.mark_flags_as_required(["workdir", "config", "mode"])


def main(argv):
    del argv
    config = FLAGS.config
    if FLAGS.device:
        with config.unlocked():
            config.device = torch.device(FLAGS.device)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    logging.getLogger().setLevel(logging.INFO)
    try:  # each mode joins torchrun's process group when launched by torchrun
        if FLAGS.mode == "train":
            run_lib.train(config, FLAGS.workdir)
        elif FLAGS.mode == "eval":
            run_lib.evaluate(config, FLAGS.workdir, FLAGS.eval_folder)
        else:
            run_lib.sample(config, FLAGS.workdir, FLAGS.eval_folder)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    app.run(main)
