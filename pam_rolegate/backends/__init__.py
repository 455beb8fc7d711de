"""Backends: the only code that talks to the world outside the broker (STS and Parameter Store
through boto3, tmpfs files, nftables, the metrics textfile)."""
