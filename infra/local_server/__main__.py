"""`python -m infra.local_server serve-local ...` / `make-tiny-model DIR`."""

from infra.local_server.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
