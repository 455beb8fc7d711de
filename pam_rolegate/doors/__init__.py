"""The broker's doors, one module each: every door parses and authenticates its own callers by the
kernel's word, bounds its work per caller, and then calls the core; none knows another exists."""
