"""Rules, pure: the configuration file to frozen values, login facts to a rule, STS's limits and
encodings. No I/O beyond reading the config, no AWS."""
