"""`python -m small4_jax.plan`: the command-line name of the deployment planner, `small4_jax.tools.plan`. Code imports
`small4_jax.tools.plan`.
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # deviceless: compiles for the GPUs on a machine without one
    from small4_jax.tools.plan import main

    sys.exit(main())
