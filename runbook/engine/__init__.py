"""The engine core: configuration, errors, redaction, findings, the remediation contract and the procedure runner,
clients and the notification sink. It knows no procedure, no application shell and no sandbox (import contracts)."""
