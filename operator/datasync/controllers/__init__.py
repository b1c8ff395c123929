"""The DataSync operator: kopf handlers, one module per kind, and what they render.

* :mod:`.syncpolicies` — source checks, publication and slot, the writer's objects, status;
* :mod:`.synctables` — admission into the publication, release on delete (finalizer);
* :mod:`.consistencychecks` — row-count comparisons and the score;
* :mod:`.rendering` — the writer Deployment, its PVC, ServiceAccount, Role and RoleBinding;
* :mod:`.naming`, :mod:`.statuses`, :mod:`.sources`, :mod:`.config` — shared pieces;
* :mod:`.operating` — kopf settings and the entry point of ``datasync operator``.

Importing this package registers nothing; :mod:`.operating` imports the handler modules.
The worker (``datasync worker``) imports only :mod:`.naming` and :mod:`.statuses`.
"""
