"""python -m services.kvstore  (same as `lmx kvstore`)."""

from services.kvstore.main import main

raise SystemExit(main())
