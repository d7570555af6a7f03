"""Train a small Hyena LM on real text with Accelerate: ``recipes/train_gla.py --arch hyena`` (same flags).

    accelerate launch recipes/train_hyena.py --text wiki --steps 300
    python recipes/train_hyena.py --steps 20 --hidden 128 --layers 2     # a quick CPU run
"""

from train_gla import main

if __name__ == "__main__":
    main(arch="hyena")
