"""Rules, pure: the configuration file to frozen values, login facts to a rule, STS's limits and
encodings. No AWS; no I/O but reading the config and, in config.check_paths, asking the broker's
own directory walk (backends/store.py) whether the paths it names would be refused."""
