"""Pure assessments shared by several procedures: evidence in, findings out (no I/O, no Prefect).

An assessment used by one flow only lives in that flow's module; one that two flows need lives here, so a flow never
imports another flow.
"""
