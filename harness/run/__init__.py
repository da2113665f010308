"""One job: a RunConfig in, cell records out (ARCHITECTURE.md, "harness/run")."""
