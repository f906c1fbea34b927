import sys

from tgi_compat.cli import main

if __name__ == "__main__":
    sys.exit(main())
