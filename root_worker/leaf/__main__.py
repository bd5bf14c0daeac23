"""``python -m root_worker.leaf``: the reference leaf (the same as ``trimmer-leaf``)."""

from root_worker.leaf.server import main

raise SystemExit(main())
