"""python -m services.admission  (same as `lmx admission`)."""

from services.admission.main import main

raise SystemExit(main())
