"""The admin commands: the `rolegate` CLI, install/uninstall, doctor."""
