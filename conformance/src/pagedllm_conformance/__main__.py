"""`python -m pagedllm_conformance` is the `pagedllm-conformance` command."""

from pagedllm_conformance.cli import main

raise SystemExit(main())
