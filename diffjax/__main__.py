import sys

from diffjax.host_memory import reexec_with_tuned_malloc

reexec_with_tuned_malloc()  # before any thread starts: one malloc heap for XLA's threads (host_memory)

from diffjax.cli import main

sys.exit(main())
