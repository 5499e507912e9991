"""Pure assessments shared by several procedures: evidence in (the typed records tasks/ returns), findings out.

They do no I/O and call no task; they import tasks/ only for the records' types.

An assessment used by one flow only lives in that flow's module; one that two flows need lives here, so a flow never
imports another flow.
"""
