"""The hook's side: what pam_python loads inside sshd and sudo (and the CLI reuses to reach the
broker). Standard library only, and nothing from the rest of the package but errors.py: importing
this folder must never start boto3, YAML or a thread inside a login. This file imports nothing."""
