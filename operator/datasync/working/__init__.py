"""The policy's writer: ``datasync worker --policy NAME --namespace NS``.

One process per SyncPolicy owns the DuckDB file (DESIGN.md §5) and runs the engine
(:func:`datasync.engine.syncing.run`, ``follow=True``) for the policy's SyncTables, publishing
each table's progress to its status. Modules:

* :mod:`.tables` — which SyncTables to run, from the API (and which the engine cannot run yet);
* :mod:`.reporting` — the engine's reporter, thread-safe, read by the status publisher;
* :mod:`.health` — ``/healthz`` and ``/readyz`` for the pod's probes;
* :mod:`.loop` — the control loop: engine thread, restarts on table-set changes, table release,
  status publishing, clean stop on SIGTERM.
"""
