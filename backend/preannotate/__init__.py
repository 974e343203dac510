"""Bulk pre-annotation: boxes to masks and automatic masks, over many tasks.

One engine (`engine.Preannotator`) serves two callers:

- "Retrieve predictions" in Label Studio (/predict without context): `retrieve.retrieve_worker`
  runs the engine while the request's deadline allows and hands the rest of the selection to the
  process's background job (`Runtime.background_job`), which writes their predictions through
  the LS API.
- The CLI, `python -m backend preannotate --project ID` (`cli`; its parser is in backend.cli_parsers):
  `project.run_project` over a whole project, pipelined, resumable, Ctrl-C safe, with retries on
  Label Studio errors.

Nothing a labeler made is touched: only predictions are written, never annotations. Import the
submodules directly; this package imports none of them.
"""
