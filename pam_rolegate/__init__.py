"""rolegate: per-user IAM roles on shared Linux hosts (a pam_python hook and a root broker).

This file must import nothing: the PAM hook loads this package inside sshd, standard library only.
"""

__version__ = "0.4.0"
