"""Rules, pure: the configuration file to frozen values, login facts to a rule, STS's limits and
encodings. No AWS; no I/O but reading the config; nothing from backends/ (tests/test_layers.py).
Checking a config against the host (its directories, its users) is pam_rolegate/hostcheck.py."""
