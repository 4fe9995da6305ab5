"""python -m services.front  (same as `lmx front`)."""

from services.front.main import main

raise SystemExit(main())
