"""`python -m sidecar` is `dotmac-sidecar`."""

from sidecar.cli import main

raise SystemExit(main())
