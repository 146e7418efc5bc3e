"""``python -m eossl.train moco ...``, which is what ``accelerate launch -m eossl.train moco ...`` runs."""

import argparse
import sys

from .cli import add_train_arguments, run_train

parser = argparse.ArgumentParser(prog="python -m eossl.train", description="eossl pre-training")
add_train_arguments(parser)
sys.exit(run_train(parser.parse_args()))
