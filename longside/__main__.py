import sys

from longside.cli import main

sys.exit(main())
