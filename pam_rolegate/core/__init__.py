"""The broker's core: grants, sessions and their records and lifecycle. No sockets, no HTTP, no
boto3 here: the doors call the registry's API, and the registry reports changes to listeners."""
