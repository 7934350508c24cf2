"""`python -m small4_jax.aot`: the command-line name of `small4_jax.tools.aot`, kept after the module moved (README, CI and the
launch files call it by this name). Code imports `small4_jax.tools.aot`.
"""

import sys

from small4_jax.console import cli_main
from small4_jax.tools.aot import main

if __name__ == "__main__":
    sys.exit(cli_main(main))  # Ctrl-C: one line, exit 130; a failing process of a job exits at once
