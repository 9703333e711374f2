"""The test suite. A regular package (not a namespace one): the nemo_toolkit wheel the contract
tests use installs a top-level `tests` package of its own, which would otherwise win."""
