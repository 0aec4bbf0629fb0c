"""``python -m cumo_megatron.quickstart [OUT]``: the whole CuMo recipe on tiny assets, on CPU."""

import sys

from cumo_megatron.quickstart.run import main

if __name__ == "__main__":
    sys.exit(main())
