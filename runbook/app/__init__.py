"""The application shell: the CLI, runbook serve, the executor, the alert intake and the procedure catalog."""
