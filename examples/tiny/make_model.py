"""Write the tiny example's checkpoint (a 2-layer Qwen3 model + tokenizer) to a directory.

    python examples/tiny/make_model.py runs/tiny-qwen3
(`slipstream run examples/tiny/config.toml` does this itself when the directory is missing.)
"""

import sys

from pipeline.tiny import make_tiny_model

if __name__ == "__main__":
    make_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-qwen3")
