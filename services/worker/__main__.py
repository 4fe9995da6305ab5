"""python -m services.worker  (same as `lmx worker`)."""

from services.worker.main import main

raise SystemExit(main())
